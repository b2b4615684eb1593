"""A kept trace's optimizer step cut at each flex-attention launch: per layer, the GPU's busy and idle time, and
what the busy time is spent on.

    python bench/layer_segments.py TRACE.json.gz [--gaps MIN_US]

TRACE: a trace kept by ``bench/gpu_bench.py`` (``TRINITY_BENCH_KEEP_TRACE=1``, GPU events only), one optimizer step
of ``accum`` micro-batches. The compute stream's kernels are cut into segments, each from one flex-attention launch
(forward ``F`` or backward ``B``) to the next; printed in order as ``F busy/idle/kernels`` (ms). Under gradient
checkpointing a micro-batch's first forward pass gives one ``F`` segment a layer (its last one runs on into the
lm_head, the loss and the backward's start); the backward gives an ``F`` (the layer's recomputed forward up to its
attention) and a ``B`` segment a layer (its last ``B`` runs on to the next micro-batch).

Then, as medians over the segments of that kind (the irregular last ones left out), a layer's kernels by group in
µs: ``first forward`` (one ``F`` segment) and ``recompute + backward`` (an ``F`` and the following ``B``). GEMMs are
split into ``big`` (cuBLAS's large tiles: the base projections) and ``small`` (the adapters' rank-r products).

``--gaps MIN_US``: also every idle stretch of the compute stream of at least that many µs, with its time from the
step's first kernel and the kernels before and after it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timeline import load  # noqa: E402

BIG_TILES = ("320x128", "256x128", "128x256")


def group(name: str) -> str:
    if name.startswith("nvjet") or "gemm" in name.lower() or "splitKreduce" in name:
        return "GEMM big" if any(t in name for t in BIG_TILES) else "GEMM small"
    if "flex" in name:
        return "flex attention"
    if "dequant" in name or "tail_kernel" in name:
        return "dequantisation"
    if "Memcpy" in name or "Memset" in name:
        return "copies and memsets"
    if name.startswith("triton"):
        return "inductor"
    return "aten"


def compute_stream(path: Path) -> list[dict]:
    """The trace's events on the stream that runs flex attention, in time order."""
    events = [e for e in load(path) if "dur" in e]
    flex = [e for e in events if "flex" in e.get("name", "")]
    stream = max({e.get("tid") for e in flex}, key=lambda t: sum(e.get("tid") == t for e in flex))
    return sorted((e for e in events if e.get("tid") == stream), key=lambda e: e["ts"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", type=Path)
    ap.add_argument("--gaps", type=float, default=0.0, help="list idle stretches of at least this many µs")
    a = ap.parse_args(argv)
    ks = compute_stream(a.trace)
    marks = [i for i, e in enumerate(ks) if e["name"].startswith("triton_tem") and "flex" in e["name"]]
    segments = []
    for start, end in zip(marks, marks[1:] + [len(ks)]):
        busy = sum(ks[i]["dur"] for i in range(start, end))
        idle = sum(max(0.0, ks[i + 1]["ts"] - ks[i]["ts"] - ks[i]["dur"]) for i in range(start, min(end, len(ks) - 1)))
        by = defaultdict(float)
        for i in range(start, end):
            by[group(ks[i]["name"])] += ks[i]["dur"]
        segments.append(("B" if "backward" in ks[start]["name"] else "F", busy, idle, end - start, by))
    print(f"{a.trace.name}: {len(ks)} kernels on the compute stream, {len(segments)} segments")
    print(" ".join(f"{k}{busy / 1e3:.2f}/{idle / 1e3:.2f}/{n}" for k, busy, idle, n, _ in segments))

    kinds = [seg[0] for seg in segments] + [None]
    first = [seg for i, seg in enumerate(segments) if seg[0] == "F" and kinds[i + 1] == "F"]
    pairs = [(seg, segments[i + 1]) for i, seg in enumerate(segments) if seg[0] == "F" and kinds[i + 1] == "B"]
    # the irregular ones: the first forward's last segment runs on into the lm_head and the loss (long), a
    # micro-batch's last B into the next micro-batch's start (more kernels)
    if first:
        typical = statistics.median(seg[1] for seg in first)
        first = [seg for seg in first if seg[1] < 2 * typical]
    if pairs:
        typical = statistics.median(b[3] for _, b in pairs)
        pairs = [(f, b) for f, b in pairs if b[3] <= typical]
    groups = sorted({g for s in segments for g in s[4]})
    rows = [("first forward", [s[4] for s in first], [s[2] for s in first]),
            ("recompute + backward", [{g: f[4].get(g, 0) + b[4].get(g, 0) for g in groups} for f, b in pairs],
             [f[2] + b[2] for f, b in pairs])]
    for label, sums, idles in rows:
        if not sums:
            continue
        med = {g: statistics.median(s.get(g, 0.0) for s in sums) for g in groups}
        total = statistics.median(sum(s.values()) for s in sums)
        parts = ", ".join(f"{g} {v:.0f}" for g, v in med.items() if v)
        print(f"{label} ({len(sums)} segments): busy {total:.0f} µs, idle {statistics.median(idles):.0f} µs "
              f"(medians); {parts}")
    if a.gaps:
        t0 = ks[0]["ts"]
        print(f"idle stretches of at least {a.gaps:g} µs:")
        for i in range(len(ks) - 1):
            gap = ks[i + 1]["ts"] - ks[i]["ts"] - ks[i]["dur"]
            if gap >= a.gaps:
                print(f"  {gap:8.0f} µs at {(ks[i]['ts'] - t0) / 1e3:8.1f} ms  {ks[i]['name'][:50]} -> "
                      f"{ks[i + 1]['name'][:60]}")


if __name__ == "__main__":
    main()
