"""Checkpoints are atomic and a killed or stopped job resumes from its newest one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import make_spec
from trinity_core.errors import JobCancelled
from trinity_core.pipeline import run_job
from trinity_core.train.trainer import checkpoints

NO_EXPORT = {"export.merge": False, "export.gguf": False, "export.evaluate": False}


def _steps(result):
    return [h["step"] for h in result.loss_history]


def test_kill_after_checkpoint_then_resume(tiny_spec, tmp_path):
    spec = make_spec(tiny_spec, **{"train.max_steps": 12, "train.save_steps": 4, **NO_EXPORT})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    workdir = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train", str(spec_file), "--workdir", str(workdir),
                             "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while not checkpoints(workdir / "checkpoints") and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = [step for step, _ in checkpoints(workdir / "checkpoints")]
    assert saved and saved[-1] < 12, saved
    assert not (workdir / "adapter").exists()

    events = []
    result = run_job(spec, workdir, events.append)
    resumed = [e.data["resumed_from"] for e in events if "resumed_from" in e.data]
    assert resumed == [saved[-1]]
    assert result.global_step == 12
    assert _steps(result) == list(range(1, 13))  # history continuous across the kill
    assert (workdir / "adapter" / "adapter_model.safetensors").is_file()


def test_killed_after_the_last_checkpoint_does_not_train_past_max_steps(tiny_spec, tmp_path):
    """A worker killed during export leaves a checkpoint at max_steps: the resumed run must not train
    again (HF's Trainer would run one step past max_steps), and keeps the same adapter and history.
    Seen in the kill -9 test: a job finished at step 31 of 30."""
    from safetensors.torch import load_file

    spec = make_spec(tiny_spec, **{"train.max_steps": 4, "train.save_steps": 2, **NO_EXPORT})
    first = run_job(spec, tmp_path)
    assert [step for step, _ in checkpoints(tmp_path / "checkpoints")][-1] == 4
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name in ("adapter", "result.json", "artifacts.json"):  # as if killed before these were written
        path = tmp_path / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    events = []
    again = run_job(spec, tmp_path, events.append)
    assert again.global_step == 4 and _steps(again) == _steps(first) == [1, 2, 3, 4]
    assert [h["loss"] for h in again.loss_history] == [h["loss"] for h in first.loss_history]
    assert not [e for e in events if e.data.get("step", 0) > 4]
    reloaded = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert reloaded.keys() == adapter.keys() and all((reloaded[k] == adapter[k]).all() for k in adapter)


def test_stop_flag_ends_at_step_boundary_and_resume_finishes(tiny_spec, tmp_path):
    spec = make_spec(tiny_spec, **{"train.max_steps": 6, "train.save_steps": 100, **NO_EXPORT})
    steps = []
    with pytest.raises(JobCancelled) as e:
        run_job(spec, tmp_path, on_step=steps.append, should_stop=lambda: len(steps) >= 3)
    assert e.value.details["global_step"] == 3
    assert [s for s, _ in checkpoints(tmp_path / "checkpoints")] == [3]  # saved on stop
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["attempts"][-1]["outcome"] == "cancelled"

    events = []
    result = run_job(spec, tmp_path, events.append)
    assert [e.data["resumed_from"] for e in events if "resumed_from" in e.data] == [3]
    assert result.status == "succeeded" and result.global_step == 6
    assert _steps(result) == list(range(1, 7))


def test_half_written_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".staging" / "checkpoint-8").mkdir(parents=True)  # a save killed midway
    (root / "step-4").mkdir()
    (root / "step-x").mkdir()
    assert [s for s, _ in checkpoints(root)] == [4]
