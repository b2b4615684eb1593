"""Flex attention's kernels in kept traces (GPU events): launches and mean µs a launch of the forward and backward
templates (``triton_tem`` kernels whose fused name holds ``flex_attention``), and the trace's total kernel time.

    python bench/flex_launches.py bench/results/2026-11-30-h200-loraflex-39-trace-*-gpu.json.gz
"""

from __future__ import annotations

import gzip
import json
import sys


def launches(path: str) -> dict[str, object]:
    with gzip.open(path, "rt") as f:
        kernels = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    found: dict[str, list[float]] = {"flex_fwd": [], "flex_bwd": []}
    for e in kernels:
        name = e["name"]
        if name.startswith("triton_tem") and "flex_attention" in name:
            found["flex_bwd" if "flex_attention_backward" in name else "flex_fwd"].append(e.get("dur", 0))
    row: dict[str, object] = {"trace": path.rsplit("/", 1)[-1], "kernels": len(kernels),
                              "kernel_ms": round(sum(e.get("dur", 0) for e in kernels) / 1e3, 1)}
    for key, durations in found.items():
        row[key] = {"launches": len(durations), "mean_us": round(sum(durations) / max(len(durations), 1), 1)}
    return row


if __name__ == "__main__":
    for trace in sys.argv[1:]:
        print(json.dumps(launches(trace)))
