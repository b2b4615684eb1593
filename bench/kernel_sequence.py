"""The GPU's kernels in launch order between two occurrences of a marker kernel, from a kept trace: one decoder
layer's work, for reading what a compiled region's kernels do beside another path's (the fused names say which
operations each holds).

    python bench/kernel_sequence.py TRACE.json.gz MARKER INDEX      # µs, stream, name from the INDEX-th MARKER
                                                                     # kernel up to the next one
    python bench/kernel_sequence.py bench/results/2026-11-29-h200-code-30-trace-layers_dora_fast_acc4-L4-gpu.json.gz \\
        flex_attention_backward 5

MARKER: a substring of the kernel's name (the first kernel of each layer's backward: Trinity's and Unsloth's flex
attention backward templates both hold ``flex_attention_backward``; their ``triton_red`` companions are skipped).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def sequence(path: Path, marker: str, index: int) -> list[tuple[float, object, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    marks = [i for i, e in enumerate(gpu) if marker in e["name"] and e["name"].startswith("triton_tem")]
    start, stop = marks[index], marks[index + 1]
    return [(e.get("dur", 0), e.get("args", {}).get("stream"), e["name"]) for e in gpu[start:stop]]


def main(argv: list[str]) -> None:
    rows = sequence(Path(argv[0]), argv[1], int(argv[2]))
    for us, stream, name in rows:
        print(f"{us:9.1f} {stream!s:>4} {name[:120]}")
    print(f"{sum(r[0] for r in rows):9.1f}      total µs, {len(rows)} kernels")


if __name__ == "__main__":
    main(sys.argv[1:])
