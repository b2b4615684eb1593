"""What is alive on the GPU at a step's memory peak, from PyTorch's allocator trace (benchmark aid).

    from mem_peak import recording
    with recording(out_path, label):      # torch.cuda.memory._record_memory_history under the hood
        ...one optimizer step...

writes ``out_path`` (text): the peak of allocated bytes during the block (the bytes already allocated
when it started included, as one line), and the allocations alive at that moment grouped by the first
stack frames outside torch's own files, largest first. The allocator's trace is replayed event by event
(``alloc`` adds a block, ``free_completed`` removes it), so the peak is the same number
``torch.cuda.max_memory_allocated`` reports for the block, to the byte, when nothing was freed that the
trace did not see allocated.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

GIB = 2**30
SKIP = ("torch/", "contextlib.py", "mem_peak.py", "<frozen", "functools.py")


def _where(frames: list[dict], depth: int = 4) -> str:
    own = [f for f in frames if not any(s in f.get("filename", "") for s in SKIP)]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in own[:depth]) or "?"


def peak_report(snapshot: dict, base_bytes: int, label: str, top: int = 40) -> str:
    trace = snapshot["device_traces"][0]
    live: dict[int, tuple[int, list]] = {}
    cur = peak = 0
    peak_at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    live.clear()
    for e in trace[:peak_at + 1]:  # replay again up to the peak: what is alive there
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list] = defaultdict(lambda: [0, 0, []])
    for size, frames in live.values():
        g = groups[_where(frames)]
        g[0] += size
        g[1] += 1
        g[2].append(size)
    lines = [f"[mem_peak] {label}: peak {(base_bytes + peak) / GIB:.3f} GiB = allocated before the step "
             f"{base_bytes / GIB:.3f} + {peak / GIB:.3f} in the step (event {peak_at} of {len(trace)})"]
    for where, (size, n, sizes) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        mib = ", ".join(f"{s / 2**20:.1f}" for s in sorted(sizes, reverse=True)[:8]) + (", …" if n > 8 else "")
        lines.append(f"  {size / GIB:8.3f} GiB  {n:5d} blocks  {where}  [MiB: {mib}]")
    if 0 <= peak_at < len(trace):
        lines.append(f"  the allocation that set the peak: {trace[peak_at]['size'] / 2**20:.1f} MiB at "
                     f"{_where(trace[peak_at].get('frames', []), 8)}")
    return "\n".join(lines)


@contextlib.contextmanager
def recording(out_path: Path, label: str):
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    try:
        yield
    finally:
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        report = peak_report(snapshot, base, label)
        Path(out_path).write_text(report + "\n")
        print(report, flush=True)
