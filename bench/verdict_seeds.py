"""Does the tiny recipe's fine-tune beat the base robustly? The verdict of examples/tiny.yaml for other
seeds (the eval split follows train.seed too) and for fewer steps, one JSON line per run.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MLFLOW_ALLOW_FILE_STORE=true python bench/verdict_seeds.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from trinity_core.pipeline import run_job
from trinity_core.spec import load_spec
from trinity_core.fixtures.tiny import build_tiny_model

RUNS = [(1, 30), (2, 30), (3407, 15)]  # (train.seed, train.max_steps); the test fixture is (3407, 30)


def main(out: Path) -> None:
    model = build_tiny_model(out / "model")
    for seed, steps in RUNS:
        spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml")
        spec.model.name_or_path = str(model)
        spec.train.seed, spec.train.max_steps = seed, steps
        v = run_job(spec, Path(tempfile.mkdtemp(dir=out))).report["verdict"]
        print(json.dumps({"seed": seed, "steps": steps, "outcome": v["outcome"],
                          "w/t/l": [v["wins"], v["ties"], v["losses"]],
                          "chrf": [v["mean"]["base"]["chrf"], v["mean"]["fine_tuned"]["chrf"]],
                          "stop": {k: v["stop_share"][k]["share"] for k in ("base", "fine_tuned", "gguf_q4_k_m")}}),
              flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
