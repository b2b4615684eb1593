"""``trinity validate``, ``trinity data prepare`` and ``trinity data inspect``.

``add_parsers(subparsers)`` registers the commands; each sets ``func(args) -> exit code``
(0 clean, 1 spec or data errors or an unreadable source; argparse itself exits 2 on bad usage).
``validate`` checks a job spec as well as a dataset (``is_spec_file`` tells which).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trinity_core.artifacts import atomic_file, atomic_write_json
from trinity_core.data.prepare import DataReport, canonical_line, iter_examples, start_report, validate_source
from trinity_core.errors import SpecError, TrinityError
from trinity_core.data.formats import FORMATS
from trinity_core.data.sources import open_source, resolve_cli_source
from trinity_core.spec import JobSpec, ModelSpec, load_spec
from trinity_core.data.template import show_masked

DEFAULT_MAX_SEQ_LENGTH = ModelSpec.model_fields["max_seq_length"].default
SHOWN_PER_KIND = 20  # errors of one kind printed in the human report (the JSON has up to 100)
SPEC_JSON_MAX_BYTES = 1 << 20  # a .json file larger than this is a dataset, not read to find out


def add_parsers(subparsers: Any) -> None:
    """Register ``validate`` and ``data {prepare,inspect}`` on an argparse subparsers object."""
    v = subparsers.add_parser("validate", help="check a job spec or a dataset and print every problem",
                              description="Check FILE, a job spec or a dataset, and print every problem at once; "
                              "exit 1 if there is any. A spec's problems name their field, with a 'did you mean' "
                              "for a misspelt one (lora.rr -> lora.r); a dataset's name their row (line) and field. "
                              "FILE is a spec when it ends in .yaml or .yml, or is a .json file holding one object "
                              "with a spec part (model, data, lora, train, ladder, export, name) and no list at its "
                              "top level, or with --spec; anything else is a dataset (JSONL, JSON, Parquet, CSV or "
                              "a save_to_disk directory).")  # fmt: skip
    v.add_argument("file", help="job spec, dataset file or save_to_disk directory")
    v.add_argument("--spec", action="store_true", help="read FILE as a job spec (YAML or JSON) whatever its name")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_mapping_args(v, "dataset options")
    v.set_defaults(func=cmd_validate)

    d = subparsers.add_parser("data", help="prepare or inspect a dataset")
    sub = d.add_subparsers(dest="data_command", required=True, metavar="{prepare,inspect}")
    p = sub.add_parser("prepare", help="convert a file, save_to_disk directory or hub dataset to canonical JSONL",
                       description="Load SOURCE, map its fields, convert to canonical chat JSONL, validate "
                       "every row and write OUTPUT plus OUTPUT's .report.json.")  # fmt: skip
    p.add_argument("-o", "--output", default="data/dataset.jsonl", help="canonical JSONL to write")
    p.add_argument("--drop-invalid", action="store_true", help="write the valid rows even if some are invalid")
    i = sub.add_parser("inspect", help="print a dataset's report and examples without writing anything")
    for cmd, func in ((p, cmd_prepare), (i, cmd_inspect)):
        cmd.add_argument("source", help="file, save_to_disk directory or hub dataset id (namespace/name)")
        cmd.add_argument("--split", default="train", help="split of a hub or save_to_disk dataset")
        cmd.add_argument("--config", help="hub dataset config (subset)")
        cmd.add_argument("--revision", help="hub dataset revision")
        cmd.add_argument("--examples", type=int, default=3, help="rendered examples to show")
        cmd.add_argument("--json", action="store_true", help="print the report as JSON")
        _add_mapping_args(cmd)
        cmd.set_defaults(func=func)


def _add_mapping_args(parser: argparse.ArgumentParser, title: str | None = None) -> None:
    parser = parser.add_argument_group(title) if title else parser
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="row format")
    parser.add_argument("--map", action="append", type=_mapping_arg, default=[], metavar="FIELD=ROLE",
                        help="map a source field to a role field (instruction, input, output, system, "
                        "conversations, messages), e.g. --map question=instruction; repeatable")  # fmt: skip
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer (model dir) for token counts and the loss mask")
    parser.add_argument("--max-seq-length", type=int, metavar="N",
                        help=f"longest row in tokens (with --tokenizer; default {DEFAULT_MAX_SEQ_LENGTH})")


def _mapping_arg(text: str) -> tuple[str, str]:
    src, sep, dst = text.partition("=")
    if not (sep and src.strip() and dst.strip()):
        raise argparse.ArgumentTypeError(f"expected FIELD=ROLE, got {text!r}")
    return src.strip(), dst.strip()


def is_spec_file(path: Path) -> bool:
    """A .yaml/.yml file, or a small .json file holding one object that looks like a spec (a spec part
    among its keys, no list at the top level: a JSON dataset object holds its rows in a list)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return True
    if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > SPEC_JSON_MAX_BYTES:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):  # JSONL in a .json file, or unreadable: a dataset
        return False
    return (isinstance(data, dict) and bool(data.keys() & JobSpec.model_fields.keys())
            and not any(isinstance(v, list) for v in data.values()))


def cmd_validate(args: argparse.Namespace) -> int:
    if args.spec or is_spec_file(Path(args.file)):
        return validate_spec(Path(args.file), as_json=args.json)
    try:
        tokenizer, max_len = _tokenizer(args)
        report = validate_source(open_source(path=args.file), format=args.format, columns=dict(args.map),
                                 tokenizer=tokenizer, max_seq_length=max_len)  # fmt: skip
    except TrinityError as e:
        return _error(e)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0 if report.ok else 1


def validate_spec(path: Path, *, as_json: bool = False) -> int:
    """Print every problem of the spec at ``path`` (field, message, did you mean); 1 if any."""
    try:
        load_spec(path, require_data=False)
        problems: list[dict[str, str]] = []
    except SpecError as e:
        problems = e.details or [{"loc": "(file)", "msg": e.message}]
    if as_json:
        print(json.dumps({"source": str(path), "kind": "spec", "ok": not problems, "errors": problems}, indent=2))
        return 1 if problems else 0
    lines = [f"spec        {path}"]
    if problems:
        lines += ["", f"ERRORS ({len(problems)})", f"  {'field':<24} message"]
        lines += [f"  {p['loc']:<24} {p['msg']}" for p in problems]
    print("\n".join(lines + ["", f"FAILED: {len(problems)} problem(s) in the job spec" if problems else "OK"]))
    return 1 if problems else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    return _run(args, write=False)


def cmd_prepare(args: argparse.Namespace) -> int:
    return _run(args, write=True)


def _run(args: argparse.Namespace, *, write: bool) -> int:
    out = Path(args.output) if write else None
    try:
        tokenizer, max_len = _tokenizer(args)
        source = resolve_cli_source(args.source, config=args.config, split=args.split, revision=args.revision)
        report, mapping = start_report(source, format=args.format, columns=dict(args.map))
        examples = [] if mapping.problems else iter_examples(source, mapping, report, tokenizer=tokenizer,
                                                             max_seq_length=max_len)  # fmt: skip
        if out is None:
            shown, written = _consume(examples, args.examples, None), False
        else:
            shown, written = _write(examples, out, report, args)
    except TrinityError as e:
        return _error(e)
    if out is not None:  # the report is written even when the data is not, to be read at leisure
        report.stats["output"] = str(out) if written else None
        report_path = out.with_suffix(".report.json")
        atomic_write_json(report_path, report.to_dict())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
        print(_format_examples(shown, tokenizer, report.unit))
        if written:
            print(f"wrote {out} ({report.stats['valid_rows']} rows) and {report_path}")
        elif out is not None:
            print(f"{out} not written (report in {report_path}): fix the rows above, or pass "
                  "--drop-invalid to keep only the valid rows")
    return 0 if report.ok or (written and report.stats.get("valid_rows")) else 1


class _NotWritten(Exception):
    """Raised inside the atomic write so that its temp file is removed."""

    def __init__(self, shown: list[Any]):
        self.shown = shown


def _write(examples: Any, out: Path, report: DataReport, args: argparse.Namespace) -> tuple[list[Any], bool]:
    """Stream the valid rows into ``out`` atomically; keep it only if every row was valid, or some
    were and ``--drop-invalid`` was given."""
    try:
        with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            shown = _consume(examples, args.examples, f)
            if not (report.ok or (args.drop_invalid and report.stats.get("valid_rows"))):
                raise _NotWritten(shown)
    except _NotWritten as e:
        return e.shown, False
    return shown, True


def _consume(examples: Any, n: int, f: Any) -> list[Any]:
    shown = []
    for ex in examples:
        if f is not None:
            f.write(canonical_line(ex.messages))
        if len(shown) < n:
            shown.append(ex)
    return shown


def _tokenizer(args: argparse.Namespace) -> tuple[Any, int | None]:
    if not args.tokenizer:
        return None, None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as e:
        raise TrinityError(f"cannot load a tokenizer from {args.tokenizer}: {e}") from None
    return tokenizer, args.max_seq_length or DEFAULT_MAX_SEQ_LENGTH


def _error(e: TrinityError) -> int:
    print(f"error: {e.message}", file=sys.stderr)
    return 1


def format_report(report: DataReport) -> str:
    """A plain-text report: summary lines, then errors and warnings as a table."""
    s, length = report.stats, report.stats.get("length") or {}
    lines = [f"source      {report.source}", f"format      {report.format or '?'}"]
    if report.mapping_note:
        lines.append(f"mapping     {report.mapping_note}")
    if "rows" in s:
        lines.append(f"{report.unit + 's':<12}{s['rows']} ({s['valid_rows']} valid, {s['invalid_rows']} invalid)")
        if length.get("max") is not None:
            limit = f"   max_seq_length {s['max_seq_length']}: {s['too_long']} too long" if s.get("max_seq_length") else ""
            lines.append(f"length      {length['unit']}: p50 {length['p50']}  p95 {length['p95']}  max {length['max']}{limit}")
        lines.append(f"duplicates  {s['duplicates']} exact (errors), {s['near_duplicates']} near (warnings)")
    for title, items, counts in (("ERRORS", report.errors, report.error_counts),
                                 ("WARNINGS", report.warnings, report.warning_counts)):  # fmt: skip
        if not counts:
            continue
        lines += ["", f"{title} ({sum(counts.values())}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")",
                  f"  {report.unit:<7} {'field':<24} message"]  # fmt: skip
        printed: dict[str, int] = {}
        for item in items:
            printed[item["kind"]] = printed.get(item["kind"], 0) + 1
            if printed[item["kind"]] <= SHOWN_PER_KIND:
                row = "-" if item["row"] is None else item["row"]
                lines.append(f"  {row!s:<7} {item['field'] or '-':<24} {item['message']}")
        for kind, n in sorted(counts.items()):
            if n > min(printed.get(kind, 0), SHOWN_PER_KIND):
                lines.append(f"  ... {n - min(printed.get(kind, 0), SHOWN_PER_KIND)} more {kind} (see --json)")
    lines += ["", "OK" if report.ok else f"FAILED: {report.summary()}"]
    return "\n".join(lines)


def _format_examples(shown: list[Any], tokenizer: Any, unit: str) -> str:
    if not shown:
        return ""
    if tokenizer is None:
        head = "\nEXAMPLES (canonical messages; pass --tokenizer DIR to see the chat template and loss mask)"
        body = ["\n".join(f"  {m['role']:>9}: {m['content']}" for m in ex.messages) for ex in shown]
    else:
        head = "\nEXAMPLES (rendered with the chat template; [[...]] = trained tokens, the rest is masked out)"
        body = [show_masked(tokenizer, ex.input_ids, ex.assistant_masks) for ex in shown]
    return "\n".join([head] + [f"--- {unit} {ex.row} ---\n{text}" for ex, text in zip(shown, body, strict=True)])
