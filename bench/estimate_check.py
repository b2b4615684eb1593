"""The pre-flight memory estimate (trinity_core/train/memory.py) against every measured GPU peak we keep.

    python bench/estimate_check.py > bench/results/2026-11-28-cpu-estimate_check.txt

CPU only: it reads the raw rows in bench/results/ (bench/gpu_bench.py's *.jsonl and the ladder test's
*ladder*.json) and the row lists of tests/core/test_memory.py, and prints for each row the measured
peak (torch.cuda.max_memory_allocated, GiB), the estimate and the error (estimate / measured - 1):

- in-sample: the rows memory.py's constants were fitted on (test_memory.MEASURED);
- out-of-sample: measured rows the constants were not fitted on (test_memory.OUT_OF_SAMPLE), and
  run_job's own training loop in the ladder runs (test_memory.RUN_JOB), where the job recorded its
  estimate next to its measured peak;
- OOM lower bounds: runs that went out of memory; the peak was at least the figure shown, so the
  estimate should be at least that (test_memory.OOM_LOWER_BOUNDS);
- every other raw row, with the reason it is in neither list (earlier fast-DoRA code, or no peak).

It exits 1 if a raw row with a peak is in no list, so the lists stay complete.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.core import test_memory as tm  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def card_of(path: Path) -> str:
    return "H100" if "-h100-" in path.name else "H200"


def raw_rows() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(RESULTS.glob("*.jsonl")):
        if "dora_loss" in path.name:
            continue
        for line in path.read_text().splitlines():
            if line.strip() and KEYS <= (row := json.loads(line)).keys():  # gpu_bench rows, not trace records
                out.append((path, row))
    return out


KEYS = {"backend", "depth", "seq", "r", "targets", "dora", "t4", "accum"}


def key_of(path: Path, r: dict) -> tuple:
    return (card_of(path), r["backend"], r["depth"], r["seq"], r["r"], r["targets"], r["dora"], r["t4"], r["accum"])


def fmt(row: tuple, measured: float, est: float) -> str:
    card, backend, layers, seq, r, targets, dora, t4, accum = row[:9]
    path = "T4  " if t4 else "bf16"
    name = f"{card} {backend:7} L{layers:<2} seq {seq} r {r:<2} {targets:4} dora {dora:4} {path} acc{accum}"
    return f"  {name}  measured {measured:7.3f}  estimate {est:7.3f}  error {100 * (est / measured - 1):+6.1f}%"


def main() -> int:
    print("memory.estimate vs measured peak GiB (error = estimate / measured - 1)\n")
    print(f"IN-SAMPLE ({len(tm.MEASURED)} rows of tests/core/test_memory.py MEASURED; the constants were "
          f"fitted on these; test tolerance ±{tm.IN_SAMPLE_TOL:.0%}):")
    errs = []
    for row in tm.MEASURED:
        est = tm.estimate_gib(row)
        errs.append(est / row[9] - 1)
        print(fmt(row, row[9], est))
    print(f"  in-sample: {len(errs)} rows, error {100 * min(errs):+.1f}% .. {100 * max(errs):+.1f}%, "
          f"median |error| {100 * statistics.median(abs(e) for e in errs):.1f}%\n")

    print(f"OUT-OF-SAMPLE, bench/gpu_bench.py loop ({len(tm.OUT_OF_SAMPLE)} rows of OUT_OF_SAMPLE; "
          f"test tolerance {100 * tm.OUT_OF_SAMPLE_TOL[0]:+.0f}% .. {100 * tm.OUT_OF_SAMPLE_TOL[1]:+.0f}%):")
    oos = []
    for row in tm.OUT_OF_SAMPLE:
        est = tm.estimate_gib(row)
        oos.append(est / row[9] - 1)
        print(fmt(row, row[9], est) + f"   [{row[10]}]")
    print(f"  out-of-sample (gpu_bench): {len(oos)} rows, error {100 * min(oos):+.1f}% .. {100 * max(oos):+.1f}%, "
          f"median |error| {100 * statistics.median(abs(e) for e in oos):.1f}%\n")

    print(f"OUT-OF-SAMPLE, run_job's own loop (ladder runs; {len(tm.RUN_JOB)} rows of RUN_JOB; test tolerance "
          f"{100 * tm.RUN_JOB_TOL[0]:+.0f}% .. {100 * tm.RUN_JOB_TOL[1]:+.0f}%):")
    for row in tm.RUN_JOB:
        est = tm.estimate_gib(row)
        print(fmt(row, row[9], est) + f"   (estimate recorded by the job: {row[11]}) [{row[10]}]")
    print()

    print(f"OOM LOWER BOUNDS ({len(tm.OOM_LOWER_BOUNDS)} rows; the run went out of memory, its peak was at "
          f"least the 'measured' figure; the estimate must not be below it):")
    for row in tm.OOM_LOWER_BOUNDS:
        est = tm.estimate_gib(row)
        print(fmt(row, row[9], est).replace("measured", "peak >=") + f"   [{row[10]}]")
    print()

    # every raw gpu_bench row: which list holds it, or why none does
    listed = {}
    for row in tm.MEASURED:
        listed.setdefault(tuple(row[:9]), []).append(("in-sample", row[9]))
    for row in tm.OUT_OF_SAMPLE:
        listed.setdefault(tuple(row[:9]), []).append(("out-of-sample", row[9]))
    for row in tm.OOM_LOWER_BOUNDS:
        listed.setdefault(tuple(row[:9]), []).append(("oom lower bound", row[9]))
    missing = 0
    print("RAW ROWS of bench/results/*.jsonl (bench/gpu_bench.py), one line each:")
    for path, r in raw_rows():
        k = key_of(path, r)
        peak = r.get("peak_alloc_gib")
        where = [w for w, v in listed.get(k, []) if peak is not None and abs(v - peak) < 5e-4]
        compiled = r["name"].startswith("compiled_")
        if compiled:
            k = k[:1] + (k[1] + "+compile",) + k[2:]
            where = [w for w, v in listed.get(k, []) if peak is not None and abs(v - peak) < 5e-4]
        if where:
            why = where[0]
        elif peak is None:
            why = f"no peak ({r['status'][:40]})"
        elif r["dora"] == "fast" and "-v3" not in path.name and path.name < "2026-11-29":
            why = "not used: fast DoRA v1/v2 (code since replaced by v3)"
        elif r["dora"] == "fast" and r["t4"] and "t4attn-3" not in path.name:
            why = "not used: T4 fast DoRA before the final code of 2026-11-29 (cast path, lean norms, lean attention)"
        elif r.get("lean_attention") == 0 and r["dora"] == "fast" and r["t4"] and "t4attn-3" in path.name:
            why = "test_t4_fast_dora_without_the_lean_attention"
        else:
            why = "MISSING from the lists"
            missing += 1
        print(f"  {path.name:40} {r['name']:22} L{r['depth']:<2} peak {peak if peak is not None else '-':>7}  {why}")
    print()
    print("LADDER RUNS (tests/gpu/test_unsloth.py::test_ladder_on_real_ooms_under_an_emulated_t4), every attempt:")
    for path in sorted(RESULTS.glob("*ladder*.json")):
        d = json.loads(path.read_text())
        print(f"  {path.name}: {d.get('layers')} layers, cap {d.get('cap_gib')} GiB")
        for job, j in d.get("jobs", {}).items():
            attempts = j.get("attempts") or (j.get("attempts_so_far") or {}).get("attempts", [])
            for a in attempts:
                s = a["settings"]
                print(f"    {job:26} {a['rung']:10} seq {s['max_seq_length']:<5} r {s['r']:<2} "
                      f"dora {s['use_dora']!s:5} {len(s['target_modules'])} targets: {a['outcome']:8} "
                      f"recorded estimate {a['estimate_gib']}")
            print(f"    {job:26} peak of the finishing process: {j.get('peak_mem_gib')}")
    if missing:
        print(f"\n{missing} raw rows with a peak are in no list of tests/core/test_memory.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
