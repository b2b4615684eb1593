"""The data stage: source -> mapping -> canonical chat rows -> validation report -> tokens + loss mask.

``validate_file`` checks a file without a model (the API's upload check, ``trinity validate``);
``prepare_data`` is what a job runs: it refuses a dataset with bad rows (listing every one) unless
``data.drop_invalid_rows``, splits off a seeded eval set (or reads ``data.eval_path``), writes canonical ``train.jsonl`` /
``eval.jsonl`` / ``report.json`` and returns pre-tokenised datasets for TRL's SFTTrainer.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from trinity_core.artifacts import atomic_write_bytes, atomic_write_json
from trinity_core.errors import DatasetError, TurnEndNotTrained
from trinity_core.data.formats import Mapping, Problem, resolve_mapping, to_messages
from trinity_core.data.label_audit import audit_turn_ends, turn_terminator
from trinity_core.data.sources import Source, open_source, open_spec_source
from trinity_core.data.template import tokenize_conversation

MAX_STORED_PER_KIND = 100  # errors and warnings of one kind kept in the report (all are counted)
SAMPLE_ROWS = 50  # rows read to detect the format and propose a mapping
_MASK64 = (1 << 64) - 1


@dataclass
class DataReport:
    """What validation found. ``errors``/``warnings`` hold ``{row, field, message, kind}``."""

    source: str
    format: str | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    mapping_note: str = ""
    unit: str = "row"  # "line" for JSONL: row numbers are line numbers
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    error_counts: dict[str, int] = field(default_factory=dict)
    warning_counts: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error_counts

    def add(self, row: int | None, problem: Problem, *, warning: bool = False) -> None:
        items, counts = (self.warnings, self.warning_counts) if warning else (self.errors, self.error_counts)
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
        if counts[problem.kind] <= MAX_STORED_PER_KIND:
            items.append({"row": row, "field": problem.field, "message": problem.message, "kind": problem.kind})

    def summary(self) -> str:
        s = self.stats
        text = f"{s.get('rows', 0)} {self.unit}s, {s.get('valid_rows', 0)} valid"
        if self.error_counts:
            text += f"; {sum(self.error_counts.values())} error(s): " + ", ".join(
                f"{n} {k}" for k, n in sorted(self.error_counts.items()))
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "format": self.format, "mapping": self.mapping,
                "mapping_note": self.mapping_note, "unit": self.unit, "stats": self.stats,
                "error_counts": self.error_counts, "warning_counts": self.warning_counts,
                "errors": self.errors, "warnings": self.warnings}  # fmt: skip


class Example(NamedTuple):
    """One valid row: its number, canonical messages and (with a tokenizer) tokens + loss mask."""

    row: int
    messages: list[dict[str, str]]
    input_ids: list[int] | None = None
    assistant_masks: list[int] | None = None


@dataclass
class PreparedData:
    """The data stage's output; ``train``/``eval`` have columns ``input_ids`` and ``assistant_masks``."""

    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    report: DataReport
    sha256: str
    format: str
    mapping: dict[str, str]


def start_report(source: Source, *, format: str = "auto", columns: dict[str, str] | None = None
                 ) -> tuple[DataReport, Mapping]:  # fmt: skip
    """Read the first rows, decide format and mapping; mapping problems become report errors."""
    sample = source.sample(SAMPLE_ROWS)
    mapping = resolve_mapping(sample, format=format, columns=columns)
    if not sample:  # no row parses as an object: the row checks will say why, row by row
        mapping.problems = []
    report = DataReport(source.name, mapping.format, dict(mapping.fields), mapping.note, source.unit)
    for problem in mapping.problems:
        report.add(None, problem)
    return report, mapping


def iter_examples(
    source: Source, mapping: Mapping, report: DataReport, *, tokenizer: Any = None,
    max_seq_length: int | None = None, truncate: bool = False,
) -> Iterator[Example]:  # fmt: skip
    """Validate every row, filling ``report``; yield the valid ones. Memory stays bounded.

    Checks: parse problems from the source, the format's own checks (missing field, wrong type,
    empty/unknown/missing turns), exact duplicates (errors) and near-duplicates (warnings, same
    text up to case and whitespace), and with a tokenizer the length against ``max_seq_length``
    (``truncate`` cuts instead, as the OOM ladder needs). With a tokenizer each example carries its
    tokens and loss mask.
    """
    seen = _Duplicates(report.unit)
    lengths = array("I")
    rows = bad = skipped = too_long = 0
    for number, raw, problem in source.rows():
        rows += 1
        problems = [problem] if problem else []
        messages = None
        if not problems:
            messages, problems = to_messages(raw, mapping)
            problems = problems or seen.check(number, messages, report)
        if problems:
            bad += 1
            for p in problems:
                report.add(number, p)
            continue
        ids = masks = None
        try:
            if tokenizer is not None:
                ids, masks = tokenize_conversation(tokenizer, messages)
                length = len(ids)
            else:
                length = sum(len(m["content"]) for m in messages)
        except DatasetError as e:
            bad += 1
            report.add(number, Problem("template", None, e.message))
            continue
        lengths.append(length)
        if tokenizer is not None and max_seq_length and length > max_seq_length:
            if not truncate:
                too_long += 1
                bad += 1
                report.add(number, Problem("too_long", None, f"{length} tokens > max_seq_length {max_seq_length}"))
                continue
            report.add(number, Problem("truncated", None, f"truncated from {length} to {max_seq_length} tokens"),
                       warning=True)  # fmt: skip
            if ids is not None:
                ids, masks = ids[:max_seq_length], masks[:max_seq_length]
                if not any(masks):
                    skipped += 1
                    report.add(number, Problem("truncated_empty", None, "no assistant token left after truncation; "
                                               "row skipped"), warning=True)  # fmt: skip
                    continue
        yield Example(number, messages, ids, masks)
    if rows == 0:
        report.add(None, Problem("empty", None, "the dataset has no rows"))
    report.stats.update(
        rows=rows, valid_rows=rows - bad - skipped, invalid_rows=bad, skipped_rows=skipped,
        duplicates=seen.duplicates, near_duplicates=seen.near_duplicates,
        length=_percentiles(lengths, "tokens" if tokenizer is not None else "chars"),
        max_seq_length=max_seq_length if tokenizer is not None else None, too_long=too_long,
    )  # fmt: skip


class _Duplicates:
    """Exact duplicates (errors) and near-duplicates (warnings: same text up to case and whitespace).

    No row is kept: one dict maps each near-duplicate group's digest to its first row and that row's
    exact digest, packed in one int (~110 bytes a row in CPython); other variants of a group, rare,
    go in a second dict so an exact copy of any of them is still found.
    """

    def __init__(self, unit: str):
        self.unit = unit
        self.groups: dict[int, int] = {}  # near digest -> first row << 64 | its exact digest
        self.variants: dict[int, int] = {}  # exact digest -> row, for rows that were near-duplicates
        self.duplicates = self.near_duplicates = 0

    def check(self, number: int, messages: list[dict[str, str]], report: DataReport) -> list[Problem]:
        exact = _digest("\0".join(m["role"] + "\1" + m["content"] for m in messages))
        near = _digest("\0".join(m["role"] + "\1" + " ".join(m["content"].lower().split()) for m in messages))
        first = self.groups.get(near)
        if first is None:
            self.groups[near] = number << 64 | exact
            return []
        same = first >> 64 if first & _MASK64 == exact else self.variants.get(exact)
        if same is not None:
            self.duplicates += 1
            return [Problem("duplicate", None, f"exact duplicate of {self.unit} {same}")]
        self.variants[exact] = number
        self.near_duplicates += 1
        report.add(number, Problem("near_duplicate", None, f"same text as {self.unit} {first >> 64} up to case "
                                   "and whitespace"), warning=True)  # fmt: skip
        return []


def validate_source(source: Source, *, format: str = "auto", columns: dict[str, str] | None = None,
                    tokenizer: Any = None, max_seq_length: int | None = None) -> DataReport:  # fmt: skip
    """Validate every row of an opened source; see :func:`iter_examples` for the checks."""
    report, mapping = start_report(source, format=format, columns=columns)
    if mapping.problems:
        return report
    for _ in iter_examples(source, mapping, report, tokenizer=tokenizer, max_seq_length=max_seq_length):
        pass
    return report


def validate_file(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                  tokenizer: Any = None, max_seq_length: int | None = None) -> DataReport:  # fmt: skip
    """Validate a local file (JSONL, JSON, Parquet, CSV) or save_to_disk directory without a model.

    Token statistics and the length check need ``tokenizer``; without one lengths are in chars.
    Raises :class:`DatasetError` only when the file cannot be opened at all.
    """
    source = open_source(path=path)
    return validate_source(source, format=format, columns=columns, tokenizer=tokenizer,
                           max_seq_length=max_seq_length)  # fmt: skip


def prepare_data(spec: Any, tokenizer: Any, out_dir: Path, *, max_seq_length: int,
                 truncate: bool = False) -> PreparedData:  # fmt: skip
    """Load, map, convert, validate, split and tokenise ``spec.data``; write canonical JSONL + report.

    Raises :class:`DatasetError` (``details`` = every bad row, capped per kind) when a row is invalid,
    unless ``spec.data.drop_invalid_rows``. ``max_seq_length`` may be below the spec's (OOM ladder);
    ``truncate=True`` cuts long rows instead of rejecting them.
    """
    import datasets

    data, out_dir = spec.data, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_spec_source(data)
    report, mapping = start_report(source, format=data.format, columns=data.columns)
    if mapping.problems:
        _fail(report, out_dir)
    examples = list(iter_examples(source, mapping, report, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                  truncate=truncate))  # fmt: skip
    if not report.ok and not data.drop_invalid_rows:
        _fail(report, out_dir)
    if not examples:
        report.add(None, Problem("empty", None, "no valid rows"))
        _fail(report, out_dir)
    check_turn_ends(examples, tokenizer, report, out_dir, warn=data.turn_end_check == "warn")
    if data.eval_path or data.eval_dataset_id:
        train, held = examples, eval_file_examples(data, tokenizer, out_dir, max_seq_length=max_seq_length,
                                                   truncate=truncate)  # fmt: skip
        report.stats["eval_source"] = Path(data.eval_path).name if data.eval_path else data.eval_dataset_id
    else:
        train_idx, eval_idx = split_indices(len(examples), fraction=data.eval_fraction,
                                            min_rows=data.eval_min_rows, seed=spec.train.seed)  # fmt: skip
        train, held = [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
    digest = hashlib.sha256()
    for name, part in (("train.jsonl", train), ("eval.jsonl", held)):
        content = "".join(canonical_line(e.messages) for e in part).encode("utf-8")
        digest.update(content)
        atomic_write_bytes(out_dir / name, content)
    report.stats.update(train_rows=len(train), eval_rows=len(held), dropped_rows=report.stats["invalid_rows"] + report.stats["skipped_rows"],
                        sha256=digest.hexdigest())  # fmt: skip
    atomic_write_json(out_dir / "report.json", report.to_dict())

    def to_dataset(part: list[Example]) -> Any:
        return datasets.Dataset.from_dict(
            {"input_ids": [e.input_ids for e in part], "assistant_masks": [e.assistant_masks for e in part]},
            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                        "assistant_masks": datasets.Sequence(datasets.Value("int8"))}),
        )  # fmt: skip

    return PreparedData(to_dataset(train), to_dataset(held), report, digest.hexdigest(), mapping.format,
                        dict(mapping.fields))  # fmt: skip


def check_turn_ends(examples: list[Example], tokenizer: Any, report: DataReport, out_dir: Path, *,
                    warn: bool = False) -> None:
    """The label audit (:mod:`trinity_core.data.label_audit`): raises :class:`TurnEndNotTrained` naming every
    row whose trained labels miss the turn terminator, or (``warn``) adds them to the report's warnings.
    A row cut to ``max_seq_length`` (``truncate``, the OOM ladder's choice, already warned as
    ``truncated``) that lost its terminator is always a warning: the template and masking are not at fault."""
    terminator = turn_terminator(tokenizer)
    found = audit_turn_ends(examples, terminator)
    by_row = {e.row: e for e in examples}
    cut = {f["row"] for f in found
           if len(tokenize_conversation(tokenizer, by_row[f["row"]].messages)[0]) > len(by_row[f["row"]].input_ids)}
    report.stats["turn_end"] = {"token": terminator.token, "id": terminator.id, "rows_checked": len(examples),
                                "rows_untrained": len(found), "rows_truncated": len(cut)}
    for f in found:
        note = " (the row was truncated)" if f["row"] in cut else ""
        report.add(f["row"], Problem("turn_end_untrained", None, f["message"] + note), warning=warn or f["row"] in cut)
    found = [f for f in found if f["row"] not in cut]
    if found and not warn:
        atomic_write_json(out_dir / "report.json", report.to_dict())
        rows = ", ".join(str(f["row"]) for f in found[:20]) + (" ..." if len(found) > 20 else "")
        raise TurnEndNotTrained(
            f"{len(found)} of {len(examples)} {report.unit}s would not teach the model to stop: {terminator.token} is "
            f"missing from the trained labels of {report.unit}s {rows} (set data.turn_end_check: warn to train "
            "anyway)", details=found[:MAX_STORED_PER_KIND], param="data")


def eval_file_examples(data: Any, tokenizer: Any, out_dir: Path, *, max_seq_length: int,
                       truncate: bool = False) -> list[Example]:  # fmt: skip
    """The rows of ``data.eval_path``, validated like the training file (same format and columns,
    ``drop_invalid_rows`` too); its report is ``eval_report.json``. Errors name ``data.eval_path``
    (``data.eval_dataset_id`` must have been resolved to it by the service)."""
    if not data.eval_path:
        raise DatasetError(f"eval dataset {data.eval_dataset_id!r} must be resolved to a file path "
                           "(data.eval_path) by the service before the data stage runs", param="data.eval_dataset_id")
    try:
        source = open_source(path=data.eval_path, split=data.split)
    except DatasetError as e:
        raise DatasetError(f"data.eval_path: {e.message}", details=e.details, param="data.eval_path") from None
    report, mapping = start_report(source, format=data.format, columns=data.columns)
    examples = [] if mapping.problems else list(iter_examples(
        source, mapping, report, tokenizer=tokenizer, max_seq_length=max_seq_length, truncate=truncate))
    if not examples and report.ok:
        report.add(None, Problem("empty", None, "no valid rows"))
    atomic_write_json(out_dir / "eval_report.json", report.to_dict())
    if mapping.problems or not examples or (not report.ok and not data.drop_invalid_rows):
        raise DatasetError(f"data.eval_path: {report.source}: {report.summary()}", details=report.errors,
                           param="data.eval_path")
    return examples


def split_indices(n: int, *, fraction: float, min_rows: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/eval split of ``n`` rows: ``round(n * fraction)`` but at least ``min_rows`` held out,
    and at least one row left for training. Both lists keep the original order."""
    n_eval = max(0, min(max(round(n * fraction), min_rows), n - 1))
    held = set(random.Random(seed).sample(range(n), n_eval))
    return [i for i in range(n) if i not in held], sorted(held)


def canonical_line(messages: list[dict[str, str]]) -> str:
    return json.dumps({"messages": messages}, ensure_ascii=False) + "\n"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a canonical JSONL file (``train.jsonl``/``eval.jsonl``) back: ``[{"messages": [...]}, ...]``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fail(report: DataReport, out_dir: Path) -> None:
    atomic_write_json(out_dir / "report.json", report.to_dict())
    raise DatasetError(f"{report.source}: {report.summary()}", details=report.errors, param="data")


def _digest(text: str) -> int:
    """64-bit digest, only compared within one process: Python's own str hash (SipHash) is enough."""
    return hash(text) & _MASK64


def _percentiles(values: array, unit: str) -> dict[str, Any]:
    if not values:
        return {"unit": unit, "p50": None, "p95": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(q: float) -> int:  # nearest-rank percentile
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"unit": unit, "p50": rank(0.50), "p95": rank(0.95), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}  # fmt: skip


def fit_to_length(dataset: Any, max_seq_length: int) -> Any:
    """The tokenised rows cut to ``max_seq_length`` for a lower rung of the OOM ladder; rows whose
    trained (assistant) tokens all fall past the cut are dropped, since they would teach nothing."""
    if max(len(ids) for ids in dataset["input_ids"]) <= max_seq_length:
        return dataset
    cut = dataset.map(lambda row: {"input_ids": row["input_ids"][:max_seq_length],
                                   "assistant_masks": row["assistant_masks"][:max_seq_length]})
    kept = cut.filter(lambda row: any(row["assistant_masks"]))
    if len(kept) == 0:
        raise DatasetError(f"no row keeps an assistant token within {max_seq_length} tokens",
                           param="model.max_seq_length")
    return kept
