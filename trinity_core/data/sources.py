"""Where rows come from: local files, ``datasets.save_to_disk`` directories and hub datasets.

Every source yields ``(number, row, problem)``: a 1-based number (the line number for JSONL, the
row number otherwise), the parsed row (or None) and the problem that stopped it being parsed (invalid
JSON, invalid UTF-8). JSONL, CSV and Parquet are read incrementally; a JSON array is read whole.
Unreadable sources raise :class:`DatasetError`; hub failures raise :class:`HubDownloadError`.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trinity_core.errors import DatasetError, HubDownloadError
from trinity_core.data.formats import Problem

RowIter = Iterator[tuple[int, Any, Problem | None]]
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv", ".tsv": "csv"}  # fmt: skip
# A list of rows inside a JSON object is looked for under these keys first.
JSON_LIST_KEYS = ("train", "data", "rows", "examples", "records", "items")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


@dataclass
class Source:
    """A readable dataset. ``rows()`` can be called more than once (detection reads the first rows)."""

    name: str
    kind: str  # jsonl, json, csv, parquet, disk, hub
    rows: Callable[[], RowIter]

    @property
    def unit(self) -> str:
        return "line" if self.kind == "jsonl" else "row"

    def sample(self, n: int = 50) -> list[dict[str, Any]]:
        """The first ``n`` rows that parse as objects (for format detection)."""
        out = []
        for _, row, _ in self.rows():
            if isinstance(row, dict):
                out.append(row)
                if len(out) >= n:
                    break
        return out


def looks_like_hub_id(text: str) -> bool:
    """``name`` or ``namespace/name`` with hub-legal characters, and not a data file name."""
    return bool(_HUB_ID.match(text)) and ".." not in text and Path(text).suffix.lower() not in SUFFIXES


def open_source(
    *, path: str | Path | None = None, hub: str | None = None, config: str | None = None,
    split: str = "train", revision: str | None = None,
) -> Source:  # fmt: skip
    """Open a local file or save_to_disk directory (``path``) or a hub dataset (``hub``)."""
    if hub:
        return _hub(hub, config=config, split=split, revision=revision)
    if path is None:
        raise DatasetError("no dataset source: give a path or a hub id", param="data")
    p = Path(path).expanduser()
    if p.is_dir():
        return _disk(p, split)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}", param="data.path")
    kind = SUFFIXES.get(p.suffix.lower()) or _sniff(p)
    if kind == "json":
        return Source(str(p), "json", lambda: _json_rows(p))
    if kind == "jsonl":
        return Source(str(p), "jsonl", lambda: _jsonl_rows(p))
    if kind == "csv":
        return Source(str(p), "csv", lambda: _csv_rows(p))
    return _parquet(p)


def open_spec_source(data: Any) -> Source:
    """Open the source a :class:`~trinity_core.spec.DataSpec` names."""
    if data.dataset_id and not (data.path or data.hub):
        raise DatasetError(f"dataset {data.dataset_id!r} must be resolved to a file path (data.path) by the "
                           "service before the data stage runs", param="data.dataset_id")  # fmt: skip
    return open_source(path=data.path, hub=data.hub, config=data.config, split=data.split, revision=data.revision)


def resolve_cli_source(text: str, **hub_args: Any) -> Source:
    """A CLI SOURCE: an existing path, else a plausible hub id, else a clear error."""
    if Path(text).expanduser().exists():
        return open_source(path=text, split=hub_args.get("split", "train"))
    if looks_like_hub_id(text):
        return open_source(hub=text, **hub_args)
    raise DatasetError(f"{text!r} is neither an existing file or directory nor a hub dataset id "
                       "(namespace/name)", param="source")  # fmt: skip


def _sniff(p: Path) -> str:
    with open(p, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    raise DatasetError(f"unsupported file type {p.suffix or '(no suffix)'!r} for {p.name}: use .jsonl, .json, "
                       ".parquet or .csv", param="data.path")  # fmt: skip


def _decode(raw: bytes, number: int) -> tuple[str | None, Problem | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, Problem("invalid_utf8", None, f"invalid UTF-8 at byte {e.start + 1} of the line")
    return (text.lstrip("\ufeff") if number == 1 else text), None


def _jsonl_rows(p: Path) -> RowIter:
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            text, problem = _decode(raw, number)
            if problem:
                yield number, None, problem
                continue
            try:  # without its newline: a line cut short is then reported where it ends, not at "column 1"
                yield number, json.loads(text.rstrip("\r\n")), None
            except json.JSONDecodeError as e:
                yield number, None, Problem("invalid_json", None, f"invalid JSON at column {e.colno}: "
                                            f"{e.msg.removesuffix(' at')}")  # fmt: skip


def _json_rows(p: Path) -> RowIter:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        yield line, None, Problem("invalid_utf8", None, f"invalid UTF-8 on line {line}; the whole file is unreadable")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: read it as JSONL
            yield from _jsonl_rows(p)
        else:
            yield e.lineno, None, Problem("invalid_json", None, f"invalid JSON at line {e.lineno}: {e.msg} "
                                          f"(column {e.colno}); the whole file is unreadable")  # fmt: skip
        return
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        key = next((k for k in JSON_LIST_KEYS if k in lists), lists[0] if len(lists) == 1 else None)
        if key is None:
            raise DatasetError(f"{p.name}: a JSON object must hold one list of rows (found lists: "
                               f"{', '.join(lists) or 'none'}); use a JSON array or JSONL", param="data.path")
        data = data[key]
    if not isinstance(data, list):
        raise DatasetError(f"{p.name}: expected a JSON array of rows", param="data.path")
    for i, row in enumerate(data, 1):
        yield i, row, None


def _csv_rows(p: Path) -> RowIter:
    """Rows numbered 1.. after the header; every value is a string. Bad UTF-8 is reported per row."""
    bad_lines: list[int] = []
    decoder = codecs.getincrementaldecoder("utf-8")

    def lines() -> Iterator[str]:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    text = decoder().decode(raw, final=True)
                except UnicodeDecodeError:
                    bad_lines.append(n)
                    text = raw.decode("utf-8", errors="replace")
                yield text.lstrip("\ufeff") if n == 1 else text

    reader = csv.DictReader(lines(), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
    reported = 0
    for number, record in enumerate(reader, 1):
        if reported < len(bad_lines):  # this record spans a line that was not valid UTF-8
            line, reported = bad_lines[reported], len(bad_lines)
            yield number, None, Problem("invalid_utf8", None, f"invalid UTF-8 on line {line} of the file")
        elif None in record:
            yield number, None, Problem("invalid_csv", None, f"{len(record[None])} more values than header fields")
        else:
            yield number, record, None


def _parquet(p: Path) -> Source:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(p)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"cannot read Parquet file {p.name}: {e}", param="data.path") from None

    def rows() -> RowIter:
        number = 0
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None

    return Source(str(p), "parquet", rows)


def _arrow_rows(ds: Any) -> RowIter:
    number = 0
    for batch in ds.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            number += 1
            yield number, dict(zip(columns, values, strict=True)), None


def _disk(p: Path, split: str) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DatasetError(f"{p} is a directory but not one written by datasets.save_to_disk ({e})",
                           param="data.path") from None  # fmt: skip
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{p}: no split {split!r}; splits are {', '.join(ds)}", param="data.split")
        ds = ds[split]
    return Source(str(p), "disk", lambda: _arrow_rows(ds))


def _hub(hub: str, *, config: str | None, split: str, revision: str | None) -> Source:
    """``datasets.load_dataset`` with the usual HF_HOME cache, HF_TOKEN and HF_HUB_OFFLINE behaviour."""
    import datasets

    where = hub + (f" (config {config})" if config else "") + (f" @ {revision}" if revision else "")
    try:
        ds = datasets.load_dataset(hub, name=config, split=split, revision=revision)
    except OSError as e:  # hub errors are all OSError: ConnectionError, HfHubHTTPError, DatasetNotFoundError
        text = str(e).rstrip(".")
        reason = ("gated" if "gated" in text.lower() else
                  "network" if isinstance(e, ConnectionError | TimeoutError) or "offline" in text.lower() else
                  "not_found" if isinstance(e, FileNotFoundError) else "download")  # fmt: skip
        hint = {"gated": " Accept its terms on the hub and set HF_TOKEN.",
                "network": " The hub is unreachable (or HF_HUB_OFFLINE=1 and the dataset is not in the "
                           "HF_HOME cache).",
                "not_found": " Check the id, config and revision (private sets need HF_TOKEN)."}.get(reason, "")
        raise HubDownloadError(f"cannot load hub dataset {where}: {text}.{hint}",
                               details={"dataset": hub, "reason": reason}, param="data.hub") from None
    except ValueError as e:  # unknown split or config
        raise DatasetError(f"hub dataset {where}: {e}", param="data.split") from None
    except datasets.exceptions.DatasetsError as e:
        raise DatasetError(f"hub dataset {where} could not be built: {e}", param="data.hub") from None
    return Source(where, "hub", lambda: _arrow_rows(ds))
