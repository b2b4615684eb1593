"""Two kept torch.profiler tables of one optimizer step (bench/gpu_bench.py, TRINITY_BENCH_PROFILE) side by side.

    python bench/profile_diff.py bench/results/2026-11-29-h200-speed-25-prof.tar.gz \\
        prof-layers_dora_fast_acc4-L48.txt prof-compiled_lora_acc4-L48.txt

Reads the device-side rows only (Self CPU 0: kernels, memcpys, memsets; the operators that launched them are
left out, and the optimizer step's device-side span, so nothing is counted twice; a table keeps its top rows
only, so the totals are of those), sums them by group (GEMMs, flex attention, the NF4 dequantisation, the
gated activation's kernels or inductor's, other inductor kernels, copies, the optimizer's update), then prints the
kernels whose totals differ most. Times in ms for the profiled step (4 micro-batches).

    python bench/profile_diff.py TRACE_A.json.gz TRACE_B.json.gz [N]

The same from two traces (``bench/gpu_timeline.py --compact``, the session script's ``KEEP_TRACE=1``): every
kernel, memcpy and memset of the step, where a table's top rows leave out the many small kernels (call 29: the
tables' rows summed to +28 ms between fast DoRA and compiled LoRA, the traces' to +106 ms).
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import tarfile
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def device_rows(table: str) -> dict[str, tuple[float, int]]:
    """Kernel name → (self CUDA ms, calls), from the rows with no CPU time of their own."""
    rows: dict[str, tuple[float, int]] = {}
    for line in table.splitlines():
        name, cols = line[:120].strip(), line[120:].split()
        if len(cols) != 10 or _ms(cols[1]) is None or _ms(cols[5]) is None:
            continue
        if _ms(cols[1]) == 0.0 and not name.startswith("Optimizer.step#"):  # that one: a span over the step's kernels
            cuda, calls = rows.get(name, (0.0, 0))
            rows[name] = (cuda + _ms(cols[5]), calls + int(cols[9]))
    return rows


def trace_rows(path: Path) -> dict[str, tuple[float, int]]:
    """Kernel, memcpy and memset name → (total ms, count) over a chrome trace."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    rows: dict[str, tuple[float, int]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            ms, calls = rows.get(e["name"], (0.0, 0))
            rows[e["name"]] = (ms + e.get("dur", 0) / 1e3, calls + 1)
    return rows


def group(name: str) -> str:
    if name.startswith("nvjet") or "gemm" in name.lower() or "cutlass" in name:
        return "GEMM"
    if name.startswith("triton_tem") and "flex_attention" in name:
        return "flex attention"
    if "dequant" in name:
        return "NF4 dequantisation"
    if name in ("_forward_kernel", "_backward_kernel") or "gelu" in name or "silu" in name:
        return "gated activation"
    if name.startswith("triton_"):
        return "other inductor kernels"
    if name.startswith("Memcpy") or name.startswith("Memset"):
        return "copies and memsets"
    if "Optimizer" in name:
        return "optimizer update"  # bitsandbytes' update kernels
    return "other"


def main(argv: list[str]) -> None:
    if argv[0].endswith((".json", ".json.gz")):  # two traces [N]
        a, b = trace_rows(Path(argv[0])), trace_rows(Path(argv[1]))
        first, second, rest = Path(argv[0]).name, Path(argv[1]).name, argv[2:]
    else:  # an archive of tables, two names in it [N]
        first, second, rest = argv[1], argv[2], argv[3:]
        with tarfile.open(Path(argv[0])) as tar:
            a, b = (device_rows(tar.extractfile(name).read().decode()) for name in (first, second))
    print(f"{'group':28} {first[:30]:>30} {second[:30]:>30} {'difference':>11}")
    groups = sorted({group(k) for k in a} | {group(k) for k in b})
    for g in groups + ["all device rows"]:
        x = sum(v[0] for k, v in a.items() if g == "all device rows" or group(k) == g)
        y = sum(v[0] for k, v in b.items() if g == "all device rows" or group(k) == g)
        print(f"{g:28} {x:30.1f} {y:30.1f} {x - y:+11.1f}")
    print("\nkernels whose totals differ most (ms, calls):")
    names = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0]))
    for k in names[:int(rest[0]) if rest else 25]:
        (x, n), (y, m) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
        print(f"{x:8.1f} {n:5d} | {y:8.1f} {m:5d} | {x - y:+7.1f}  {group(k):22} {k[:110]}")


if __name__ == "__main__":
    main(sys.argv[1:])
