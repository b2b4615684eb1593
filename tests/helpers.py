"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations


def make_spec(spec, **overrides):
    """A copy of a spec with dotted overrides: make_spec(s, **{"train.max_steps": 3})."""
    spec = spec.model_copy(deep=True)
    for dotted, value in overrides.items():
        part, name = dotted.split(".")
        setattr(getattr(spec, part), name, value)
    return spec


def cache_hub_model(cache_dir, repo_id: str, files: dict[str, str]) -> None:
    """Lay ``repo_id`` out in a Hugging Face cache as a download would (refs/main → a snapshot)."""
    repo, commit = cache_dir / ("models--" + repo_id.replace("/", "--")), "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (repo / "snapshots" / commit / name).write_text(text)


_WORKER_LIKE_CHILD = """
import json
import sys
from trinity_core.options import RunOptions
from trinity_core.spec import JobSpec
from trinity_core.train.backends.unsloth import UnslothBackend

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
UnslothBackend(spec, RunOptions())  # chooses Unsloth's compile mode and imports it, before transformers
from trinity_core.pipeline import run_job

result = run_job(spec, sys.argv[2])
print(json.dumps({"backend": result.backend, "loss": [h["loss"] for h in result.loss_history],
                  "merged_weights": result.report["merged_weights"]["ok"] if result.report else None}))
"""


def run_job_as_the_worker(spec, workdir, tmp_path) -> dict:
    """``run_job(spec, workdir)`` with the Unsloth backend in a fresh process without ``UNSLOTH_COMPILE_DISABLE`` in
    its environment, as the worker runs a job (the backend chooses Unsloth's compile mode before importing it):
    ``{"backend": the job's backend info, "loss": its losses, "merged_weights": the report's check or None}``."""
    import json
    import os
    import subprocess
    import sys

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != "UNSLOTH_COMPILE_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, "-c", _WORKER_LIKE_CHILD, str(spec_file), str(workdir)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
