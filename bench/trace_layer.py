"""One decoder layer's kernels, in order, from a profiled step's trace, and the step's kernel time by kind.

    python bench/trace_layer.py TRACE.json.gz [--anchor fprop] [--index 10] [--before 8]

``bench/gpu_bench.py`` keeps the trace with ``TRINITY_BENCH_PROFILE``, ``TRINITY_BENCH_TRACE=1`` and
``TRINITY_BENCH_KEEP_TRACE=1``. Prints, from ``--before`` kernels ahead of the ``--index``-th kernel whose name holds
``--anchor`` (cuDNN's attention forward: "fprop"; its backward: "bprop") to the next such kernel, each kernel's gap
to the one before and its duration (microseconds); then the step's GPU time by kind (GEMMs, cuDNN, inductor's Triton
kernels, NF4 dequantisation, the rest by name). What it showed (calls 66 and 67, docs/BENCHMARKS.md): the copies
between the (batch, heads, seq, dim) and (batch, seq, heads, dim) memory orders around cuDNN's kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def kind(name: str) -> str:
    if "nvjet" in name or "gemm" in name.lower() or "cutlass" in name:
        return "GEMMs"
    if "cudnn" in name:
        return "cuDNN"
    if name.startswith("triton"):
        return "Triton (inductor)"
    if "dequantize" in name:
        return "NF4 dequantisation"
    return name[:40]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--anchor", default="fprop")
    p.add_argument("--index", type=int, default=10)
    p.add_argument("--before", type=int, default=8)
    a = p.parse_args()
    opener = gzip.open if a.trace.endswith(".gz") else open
    with opener(a.trace, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    anchors = [i for i, e in enumerate(gpu) if a.anchor in e["name"]]
    start, stop = anchors[a.index] - a.before, anchors[a.index + 1] + 1
    end = gpu[start - 1]["ts"] + gpu[start - 1]["dur"]
    print(f"# {a.trace}: kernels {start}..{stop - 1} of {len(gpu)} (anchor {a.anchor!r} #{a.index})")
    print(f"{'gap us':>8} {'dur us':>8}  kernel")
    for e in gpu[start:stop]:
        print(f"{e['ts'] - end:8.1f} {e['dur']:8.1f}  {e['name'][:110]}")
        end = e["ts"] + e["dur"]
    totals: dict[str, float] = defaultdict(float)
    for e in gpu:
        totals[kind(e["name"])] += e["dur"]
    print("\n# the step's GPU time by kind (ms)")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{us / 1e3:9.1f}  {name}")


if __name__ == "__main__":
    main()
