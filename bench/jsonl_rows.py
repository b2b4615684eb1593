"""One JSON object per line, printed and (with a path) appended to a file: the benchmark scripts' raw output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def emitter(path: Path | None, mode: str = "a") -> Callable[[dict], None]:
    """``emit(row)``: the row as one JSON line on stdout, flushed, and written to ``path`` where given (opened with
    ``mode``: appended to by default)."""
    out = open(path, mode) if path else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    return emit
