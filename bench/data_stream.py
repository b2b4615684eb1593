"""Streaming validation benchmark: rows/s and peak RSS of ``validate_file`` on a large JSONL.

    python bench/data_stream.py            # ~1 GB file in /tmp
    python bench/data_stream.py --mb 200   # smaller

The file holds ~1 KB alpaca-style rows (question/answer, mapped automatically), all distinct, with
one broken line (truncated JSON) and one exact duplicate every 10,000 rows, so the error paths and
the per-kind cap run too. Validation runs in a fresh child process, so its peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) is the validator's alone, imports included.
Without a tokenizer, as the API's upload check runs. Memory grows with the row count only through
the duplicate tables (two 64-bit digests per row), not with the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model learns to answer short questions about data pipelines memory tokens and evaluation "
         "while the validator streams every line and reports each problem with its line number").split()  # fmt: skip


def write_corpus(path: Path, mb: int, seed: int = 0) -> int:
    """Write ~``mb`` MB of JSONL rows to ``path``; return the number of lines."""
    rng = random.Random(seed)
    target, size, n = mb * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            n += 1
            if n % 10_000 == 0:
                line = '{"question": "truncated'  # invalid JSON
            elif n % 10_000 == 1 and n > 1:
                line = prev  # exact duplicate of the previous row
            else:
                question = " ".join(rng.choices(WORDS, k=25))
                answer = " ".join(rng.choices(WORDS, k=130))
                line = json.dumps({"id": n, "question": f"{n}: {question}?", "answer": answer})
                prev = line
            f.write(line + "\n")
            size += len(line) + 1
    return n


CHILD = """
import json, resource, sys, time
from trinity_core.data.prepare import validate_file
t0 = time.perf_counter()
report = validate_file(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "stats": report.stats, "error_counts": report.error_counts,
                  "stored_errors": len(report.errors),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1000, help="size of the JSONL file in MB (default 1000)")
    ap.add_argument("--path", default="/tmp/trinity_bench_stream.jsonl")
    ap.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = ap.parse_args()
    path = Path(args.path)
    t0 = time.perf_counter()
    lines = write_corpus(path, args.mb)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path}: {size_mb:.0f} MB, {lines} lines in {time.perf_counter() - t0:.1f} s")
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                              check=True)  # fmt: skip
        result = json.loads(proc.stdout)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    s = result["stats"]
    print(f"validate_file: {s['rows']} lines ({s['valid_rows']} valid) in {result['seconds']:.1f} s = "
          f"{s['rows'] / result['seconds']:,.0f} rows/s, {size_mb / result['seconds']:.1f} MB/s")
    print(f"errors counted: {result['error_counts']} (stored: {result['stored_errors']})")
    print(f"peak RSS of the validating process: {max(child_rss, result['peak_rss_mb']):.0f} MB "
          f"for a {size_mb:.0f} MB file")


if __name__ == "__main__":
    main()
