"""CUDA time per micro-batch from the kept torch.profiler tables (bench/results/*profile*.txt).

    python bench/profile_totals.py bench/results/*-profile-*.txt

Each table is `prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)` over 3
micro-batches (bench/gpu_bench.py profile). Its rows mix two levels: CPU-side operators (aten::mm,
aten::mul, ...), whose "Self CUDA" is the time of the kernels they launched, and the device-side
events themselves (kernel names, "Memcpy DtoD"; Self CPU 0). Adding up every row counts each
kernel twice (once as itself, once in its operator). The table's footer, "Self CUDA time total",
counts the device-side events only (torch.autograd.profiler_util: the sum of self device time over
events whose device type is CUDA), so it is the kernel total: this script divides it by 3.

It also prints, as a check, the sum of the device-side rows that made the top 40 (a lower bound on
the kernel total: the tail below row 40 is cut) and the sum of all 40 rows (the double count).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MICRO_BATCHES = 3


def ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def totals(path: Path) -> dict:
    footer, rows = None, []
    for line in path.read_text().splitlines():
        if line.startswith("Self CUDA time total:"):
            footer = ms(line.split(":")[1].strip())
            continue
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) == 11 and cols[0] != "Name" and cols[-1].isdigit():
            rows.append({"name": cols[0], "self_cpu": ms(cols[2]), "self_cuda": ms(cols[6])})
    device_rows = [r for r in rows if r["self_cpu"] == 0.0]
    return {"rows": len(rows), "footer_ms": footer,
            "kernels_per_mb": footer / MICRO_BATCHES,
            "device_rows_top40_per_mb": sum(r["self_cuda"] for r in device_rows) / MICRO_BATCHES,
            "all_rows_top40_per_mb": sum(r["self_cuda"] for r in rows) / MICRO_BATCHES}


def main(paths: list[str]) -> None:
    print(f"{'file':48} {'footer (3 mb)':>14} {'kernels/mb':>11} {'top-40 device rows/mb':>22} "
          f"{'top-40 all rows/mb':>19}")
    for p in paths:
        t = totals(Path(p))
        print(f"{Path(p).name:48} {t['footer_ms']:>11.3f} ms {t['kernels_per_mb']:>8.1f} ms "
              f"{t['device_rows_top40_per_mb']:>19.1f} ms {t['all_rows_top40_per_mb']:>16.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(str(p) for p in (Path(__file__).parent / "results").glob("*-profile-*.txt")))
