"""Final loss after the same steps on the same data: Trinity's fast DoRA vs PEFT's own DoRA.

Each seed trains the tiny recipe (examples/tiny.yaml, rsLoRA + DoRA on all 42 projections)
twice through ``run_job`` — once with ``RunOptions(fast_dora=False)`` (PEFT's DoRA), once with fast DoRA —
with the same seed, so the same LoRA init and the same data order: the pairs differ only in the
DoRA implementation. Noise is the spread between seeds. Prints one JSON line per run and a summary:

    python bench/dora_loss.py --seeds 0 1 2 --steps 60                          # CPU, fp32
    python bench/dora_loss.py --backend unsloth --dtype bfloat16 --seeds 0 1 2  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "trinity-tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--backend", default="peft", choices=["peft", "unsloth"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here too")
    a = ap.parse_args(argv)

    if a.backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    from trinity_core.options import RunOptions
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec
    from trinity_core.fixtures.tiny import build_tiny_model

    if not (a.model / "config.json").exists():
        build_tiny_model(a.model)
    rows = []
    for seed in a.seeds:
        for impl in ("peft", "fast"):
            spec = load_spec(ROOT / "examples" / "tiny.yaml")
            spec.model.name_or_path = str(a.model)
            spec.model.backend = a.backend
            spec.model.compute_dtype = a.dtype
            spec.train.seed = seed
            spec.train.max_steps = a.steps
            spec.train.save_steps = a.steps + 1
            spec.export.merge = spec.export.gguf = spec.export.evaluate = False
            with tempfile.TemporaryDirectory() as work:
                t0 = time.time()
                result = run_job(spec, work, options=RunOptions(fast_dora=impl == "fast"))
            losses = [h["loss"] for h in result.loss_history]
            row = {"seed": seed, "impl": impl, "backend": a.backend, "dtype": result.backend["compute_dtype"],
                   "fast_dora_layers": result.backend["fast_dora_layers"], "steps": len(losses),
                   "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
                   "last10_mean": round(statistics.fmean(losses[-10:]), 4),
                   "train_s": result.train_seconds, "wall_s": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    summary(rows)


def summary(rows: list[dict]) -> None:
    by = {(r["seed"], r["impl"]): r["last10_mean"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    diffs = [by[s, "fast"] - by[s, "peft"] for s in seeds if (s, "fast") in by and (s, "peft") in by]
    for impl in ("peft", "fast"):
        vals = [by[s, impl] for s in seeds if (s, impl) in by]
        spread = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        print(f"{impl:5} mean of last-10 loss over seeds {statistics.fmean(vals):.4f}  seed std {spread:.4f}")
    if diffs:
        print(f"paired fast − peft per seed: {[round(d, 4) for d in diffs]}  mean {statistics.fmean(diffs):+.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
