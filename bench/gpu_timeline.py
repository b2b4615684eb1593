"""Where a profiled step leaves the GPU waiting: the gaps between its kernels, and what the host was doing then.

    python bench/gpu_timeline.py TRACE.json[.gz]          # a torch.profiler chrome trace (CPU and CUDA activities)

``bench/gpu_bench.py`` writes one per row with ``TRINITY_BENCH_PROFILE`` and ``TRINITY_BENCH_TRACE=1`` (and
``TRINITY_BENCH_PROFILE_CPU=1``: the host's operators, which name a gap), and this report beside it. Why: in
call 25 (docs/BENCHMARKS.md) fast DoRA's step took 130 ms longer than compiled LoRA's by the wall clock but only
48 ms longer in kernel time; the kernel tables do not say where the other ~80 ms go.

The report:
- the span of the GPU's activity (first kernel, memcpy or memset to the end of the last), the time some kernel ran
  (the union over streams), and the idle time between;
- each gap of at least ``--min-gap-us`` between two stretches of activity, put down to the host operator that
  launched the next kernel: the innermost and the outermost CPU operator around that launch (a gap whose launch
  came after the gap began is the GPU waiting on the host), or "host sync" when a ``cuda*Synchronize`` ran inside
  the gap;
- the gaps summed by those operators, largest first;
- by stream: each stream's busy time and its memcpy time, the time two streams ran at once (the sum of the
  streams' busy times less the union), and the copies' exposed time (a copy running while no kernel ran on any
  stream): Unsloth's offloaded checkpoints copy each layer's input on a side stream, hidden under compute or not.

    python bench/gpu_timeline.py --compact TRACE.json OUT.json.gz   # the events this report reads, small enough
                                                                    # to come back from a device call
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace.get("traceEvents", trace if isinstance(trace, list) else []) if e.get("ph") == "X"]


def report(events: list[dict], min_gap_us: float = 5.0, top: int = 25) -> str:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU activity in the trace\n"
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    threads: dict = defaultdict(list)  # the host's operators by thread (autograd's backward runs in its own)
    for e in sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"]):
        threads[e.get("tid")].append(e)
    starts = {tid: [e["ts"] for e in ops] for tid, ops in threads.items()}
    tops: dict = {}  # each thread's outermost operators (not inside another)
    for tid, ops in threads.items():
        tops[tid], until = [], float("-inf")
        for e in ops:
            if e["ts"] >= until:
                tops[tid].append(e)
                until = e["ts"] + e.get("dur", 0)
    top_starts = {tid: [e["ts"] for e in ops] for tid, ops in tops.items()}
    syncs = sorted(e["ts"] for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in SYNCS)

    busy, gaps = 0.0, []
    end = gpu[0]["ts"]
    run_start = gpu[0]["ts"]
    for e in gpu:
        if e["ts"] > end:
            busy += end - run_start
            if e["ts"] - end >= min_gap_us:
                gaps.append((end, e["ts"], e))
            run_start = e["ts"]
        end = max(end, e["ts"] + e.get("dur", 0))
    busy += end - run_start
    span = end - gpu[0]["ts"]

    def around(tid, ts: float) -> tuple[str, str]:
        """(innermost, outermost) operator of thread ``tid`` running at ``ts``: the innermost is the latest to
        start of those that contain ``ts``."""
        ops, inner = threads.get(tid, []), None
        i = bisect.bisect_right(starts.get(tid, []), ts) - 1
        for j in range(i, max(i - 5000, -1), -1):
            if ops[j]["ts"] + ops[j].get("dur", 0) >= ts:
                inner = ops[j]["name"]
                break
        k = bisect.bisect_right(top_starts.get(tid, []), ts) - 1
        outer = tops[tid][k]["name"] if k >= 0 and tops[tid][k]["ts"] + tops[tid][k].get("dur", 0) >= ts else None
        return inner or "(no operator)", outer or "(no operator)"

    by_inner, by_outer, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    host_bound = 0.0
    for start, stop, nxt in gaps:
        width = stop - start
        i = bisect.bisect_left(syncs, start)
        if i < len(syncs) and syncs[i] < stop:
            key = ("host sync", "host sync")
        else:
            launch = launches.get(nxt.get("args", {}).get("correlation"))
            if launch is None:
                key = ("(launch not in trace)", "(launch not in trace)")
            else:
                key = around(launch.get("tid"), launch["ts"])
                if launch["ts"] > start:
                    host_bound += width
        by_inner[key[0]] += width
        by_outer[key[1]] += width
        counts[key[0]] += 1

    lines_streams = streams_report(gpu)
    lines = [f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms; "
             f"{len(gaps)} gaps of >= {min_gap_us:g} us hold {sum(b - a for a, b, _ in gaps) / 1e3:.1f} ms, "
             f"{host_bound / 1e3:.1f} ms of them while the next kernel was not launched yet"]
    lines.append(f"\nby the innermost host operator at the next launch (ms, gaps), top {top}:")
    lines += [f"{ms / 1e3:9.2f} {counts[name]:6d}  {name[:110]}"
              for name, ms in sorted(by_inner.items(), key=lambda kv: -kv[1])[:top]]
    lines.append(f"\nby the outermost host operator at the next launch (ms), top {top}:")
    lines += [f"{ms / 1e3:9.2f}  {name[:110]}" for name, ms in sorted(by_outer.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines + lines_streams) + "\n"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(intervals, holes) -> float:
    """Length of the union ``intervals`` outside the union ``holes`` (both sorted, disjoint)."""
    total, j = 0.0, 0
    for a, b in intervals:
        covered = 0.0
        while j < len(holes) and holes[j][1] <= a:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] < b:
            covered += min(b, holes[k][1]) - max(a, holes[k][0])
            k += 1
        total += (b - a) - covered
    return total


def streams_report(gpu: list[dict]) -> list[str]:
    """The by-stream lines of :func:`report` (ms)."""
    by_stream: dict = defaultdict(list)
    copies: dict = defaultdict(list)
    for e in gpu:
        stream = e.get("args", {}).get("stream", e.get("tid"))
        interval = (e["ts"], e["ts"] + e.get("dur", 0))
        by_stream[stream].append(interval)
        if e.get("cat") == "gpu_memcpy":
            copies[stream].append(interval)
    unions = {s: _union(v) for s, v in by_stream.items()}
    everything = _union([i for v in by_stream.values() for i in v])
    kernels = _union([(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu if e.get("cat") == "kernel"])
    all_copies = _union([i for v in copies.values() for i in v])
    lines = ["\nby stream (ms): busy, of it memcpy"]
    for s in sorted(unions, key=lambda s: -_length(unions[s])):
        lines.append(f"{_length(unions[s]) / 1e3:9.2f} {_length(_union(copies[s])) / 1e3:9.2f}  stream {s}")
    lines.append(f"two or more streams at once: {(sum(map(_length, unions.values())) - _length(everything)) / 1e3:.2f}"
                 f" ms; memcpy {_length(all_copies) / 1e3:.2f} ms, of it with no kernel running: "
                 f"{_minus(all_copies, kernels) / 1e3:.2f} ms")
    return lines


def compact(src: Path, dst: Path) -> None:
    """``src`` (a chrome trace) reduced to what :func:`report` reads, gzipped to ``dst``."""
    keep = GPU_CATEGORIES | {"cuda_runtime", "cuda_driver", "cpu_op", "user_annotation"}
    events = [{"ph": "X", "cat": e["cat"], "name": e.get("name", "")[:120], "ts": e["ts"], "dur": e.get("dur", 0),
               "tid": e.get("tid"), "args": {k: v for k, v in e.get("args", {}).items()
                                             if k in ("correlation", "stream")}}
              for e in load(src) if e.get("cat") in keep]
    with gzip.open(dst, "wt") as f:
        json.dump({"traceEvents": events}, f)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--compact"]:
        return compact(Path(argv[1]), Path(argv[2]))
    print(report(load(Path(argv[0])), *(float(x) for x in argv[1:2])), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
