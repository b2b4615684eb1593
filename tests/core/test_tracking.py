"""TensorBoard files of the tiny run (the session's one trained run), read back with TensorBoard's own reader."""

from __future__ import annotations

import json

import pytest


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_files_hold_the_logged_steps(trained_run):
    result, workdir, events = trained_run
    scalars = _scalars(workdir / "tensorboard")
    metrics = [e.data for e in events if e.type == "metrics"]
    assert len(metrics) == 30
    for tag, field in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("train/grad_norm", "grad_norm"),
                       ("train/peak_mem_gib", "peak_mem_gib")):
        assert [s for s, _ in scalars[tag]] == [m["step"] for m in metrics], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([m[field] for m in metrics], rel=1e-6), tag
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in result.loss_history], rel=1e-6)
    # the report's held-out losses, at the last step
    held_out = {name: m["loss"] for name, m in result.report["models"].items() if m.get("loss") is not None}
    assert held_out and "base" in held_out
    for name, loss in held_out.items():
        assert scalars[f"eval/{name}_loss"] == [(30, pytest.approx(loss, rel=1e-6))]


def test_tensorboard_files_are_artifacts(trained_run):
    from trinity_core.artifacts import sha256_file

    _, workdir, _ = trained_run
    rows = [r for r in json.loads((workdir / "artifacts.json").read_text()) if r["kind"] == "tensorboard"]
    files = sorted(p for p in (workdir / "tensorboard").rglob("*") if p.is_file())
    assert files and [r["path"] for r in rows] == [p.relative_to(workdir).as_posix() for p in files]
    for r in rows:  # closed before the manifest hashed them
        assert r["name"] == r["path"] and r["sha256"] == sha256_file(workdir / r["path"])


# ── MLflow (the session's trained run logs to a local file store: conftest's mlflow_uri) ────────────

def _mlflow_run(mlflow_uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    return client, client.get_run(run_id)


def _artifact_files(client, run_id, folder=""):
    files = []
    for f in client.list_artifacts(run_id, folder or None):
        files += _artifact_files(client, run_id, f.path) if f.is_dir else [f.path]
    return files


def test_mlflow_run_holds_the_spec_metrics_report_and_gguf(trained_run, mlflow_uri, tiny_spec, tmp_path):
    from trinity_core.artifacts import sha256_file

    result, workdir, events = trained_run
    run_id = result.tracking["mlflow_run_id"]
    assert run_id and result.tracking["mlflow_error"] is None
    assert json.loads((workdir / "result.json").read_text())["tracking"]["mlflow_run_id"] == run_id
    assert [e.data["mlflow_run_id"] for e in events if "mlflow_run_id" in e.data] == [run_id]
    client, run = _mlflow_run(mlflow_uri, run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == workdir.name
    assert run.data.tags["trinity.job_id"] == workdir.name and run.data.tags["trinity.rung"] == result.final_rung

    params = run.data.params  # the spec, flattened
    assert params["lora.r"] == str(tiny_spec.lora.r) and params["train.max_steps"] == str(tiny_spec.train.max_steps)
    assert float(params["train.learning_rate"]) == tiny_spec.train.learning_rate
    assert params["model.name_or_path"] == tiny_spec.model.name_or_path
    assert json.loads(params["export.quantizations"]) == list(tiny_spec.export.quantizations)

    metrics = [e.data for e in events if e.type == "metrics"]
    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [m["step"] for m in metrics]  # one point per logged step
    assert [m.value for m in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run_id, "train/learning_rate")] == [m["step"] for m in metrics]
    for name, scores in result.report["models"].items():
        if scores.get("loss") is not None:
            [point] = client.get_metric_history(run_id, f"eval/{name}_loss")
            assert (point.step, point.value) == (result.global_step, pytest.approx(scores["loss"], rel=1e-6))

    gguf = result.export["gguf"]["q4_k_m"]
    assert sorted(_artifact_files(client, run_id)) == sorted(
        ["gguf/model-q4_k_m.gguf", "report/loss.png", "report/report.json", "report/report.md", "result.json"])
    assert gguf == "gguf/model-q4_k_m.gguf"
    local = client.download_artifacts(run_id, gguf, str(tmp_path))
    assert sha256_file(local) == sha256_file(workdir / gguf)
    uploaded = json.loads(open(client.download_artifacts(run_id, "report/report.json", str(tmp_path))).read())
    assert uploaded == json.loads((workdir / "report" / "report.json").read_text())


def test_docs_tracking_examples_read_the_run(trained_run, mlflow_uri, tmp_path):
    """docs/API.md "Tracking": the TensorBoard reader on the downloaded artifacts, and the MLflow lookup."""
    import shutil

    from tests.service.docs import python_blocks
    from trinity_core.artifacts import sha256_file

    result, workdir, events = trained_run
    tensorboard_example, mlflow_example = python_blocks("Tracking")
    downloaded = tmp_path / "tb"  # what the curl loop in the docs leaves: the artifacts' files side by side
    downloaded.mkdir()
    for row in json.loads((workdir / "artifacts.json").read_text()):
        if row["kind"] == "tensorboard":
            shutil.copy(workdir / row["path"], downloaded / row["name"].rsplit("/", 1)[-1])
    example: dict = {}
    exec(compile(tensorboard_example, "docs/API.md", "exec"), example)  # noqa: S102
    scalars = example["tensorboard_scalars"](str(downloaded))
    assert [s for s, _ in scalars["train/loss"]] == [e.data["step"] for e in events if e.type == "metrics"]
    assert scalars["train/loss"][-1][1] == pytest.approx(result.loss_history[-1]["loss"], rel=1e-6)

    example = {}
    exec(compile(mlflow_example, "docs/API.md", "exec"), example)  # noqa: S102
    job = example["mlflow_job"](mlflow_uri, workdir.name, download_to=str(tmp_path / "dl"))
    assert job["run_id"] == result.tracking["mlflow_run_id"] and job["status"] == "FINISHED"
    assert job["params"]["lora.r"] == str(result.resolved_spec["lora"]["r"])
    assert job["loss"] == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in result.loss_history]
    assert "gguf/model-q4_k_m.gguf" in job["artifacts"] and "report/report.md" in job["artifacts"]
    assert sha256_file(f"{job['gguf']}/model-q4_k_m.gguf") == sha256_file(workdir / "gguf" / "model-q4_k_m.gguf")


# ── resume and a tracking server that is down (one short training run each) ────────────────────────

NO_EXPORT = {"export.merge": False, "export.gguf": False, "export.evaluate": False}


def test_resumed_job_writes_no_step_twice(tiny_spec, tmp_path):
    """A worker killed at step 3 whose newest checkpoint is step 2: the resumed run trains step 3 again.
    TensorBoard must show each step once (the resumed file purges the stale step 3) and MLflow's history
    too (the resumed run logs only the steps the run lacks)."""
    import shutil

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from trinity_core.errors import JobCancelled
    from trinity_core.pipeline import run_job
    from trinity_core.train.trainer import checkpoints

    from tests.helpers import make_spec
    from trinity_core.options import RunOptions

    uri = (tmp_path / "mlruns").as_uri()
    spec = make_spec(tiny_spec, **{"train.max_steps": 6, "train.save_steps": 2, **NO_EXPORT})
    workdir = tmp_path / "work"
    steps, first = [], []
    with pytest.raises(JobCancelled):
        run_job(spec, workdir, first.append, on_step=steps.append, should_stop=lambda: len(steps) >= 3,
                options=RunOptions(mlflow_tracking_uri=uri))
    assert [s for s, _ in checkpoints(workdir / "checkpoints")][-2:] == [2, 3]
    shutil.rmtree(workdir / "checkpoints" / "step-3")  # as if killed before step 3's checkpoint was complete
    [run_id] = {e.data["mlflow_run_id"] for e in first if "mlflow_run_id" in e.data}
    client, run = _mlflow_run(uri, run_id)
    assert run.info.status == "KILLED"
    assert json.loads((workdir / "result.json").read_text())["tracking"]["mlflow_run_id"] == run_id  # the cancelled result

    second = []
    result = run_job(spec, workdir, second.append, options=RunOptions(mlflow_tracking_uri=uri))
    assert [e.data["resumed_from"] for e in second if "resumed_from" in e.data] == [2]
    resumed = {e.data["step"]: e.data for e in second if e.type == "metrics"}
    assert sorted(resumed) == [3, 4, 5, 6]

    files = sorted((workdir / "tensorboard").iterdir())
    assert len(files) == 2  # the killed run's file still holds its step 3
    raw = [v.tag for f in files for e in EventFileLoader(str(f)).Load() for v in e.summary.value
           if e.step == 3 and v.tag == "train/loss"]
    assert len(raw) == 2
    scalars = _scalars(workdir / "tensorboard")
    for tag, points in scalars.items():
        assert len({s for s, _ in points}) == len(points), (tag, points)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert dict(scalars["train/loss"])[3] == pytest.approx(resumed[3]["loss"], rel=1e-6)  # the resumed value

    assert result.tracking["mlflow_run_id"] == run_id  # the same run, continued
    client, run = _mlflow_run(uri, run_id)
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in loss}[6] == pytest.approx(resumed[6]["loss"], rel=1e-6)


def test_unreachable_tracking_server_is_a_warning_not_a_failure(tiny_spec, tmp_path):
    """`trinity train --mlflow-uri` with nothing listening: the job succeeds, with one warning event."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.helpers import make_spec

    spec = make_spec(tiny_spec, **{"train.max_steps": 2, **NO_EXPORT})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    workdir = tmp_path / "work"
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # MLflow's own knob: fail at once, not after 7 retries
    done = subprocess.run([sys.executable, "-m", "cli", "train", str(spec_file), "--workdir", str(workdir), "--json",
                           "--mlflow-uri", "http://127.0.0.1:9"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "status: succeeded" in done.stdout and "mlflow run" not in done.stdout
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    warnings = [e for e in events if e["level"] == "warning" and "mlflow_error" in e["data"]]
    assert len(warnings) == 1, [e["message"] for e in events if e["level"] == "warning"]
    assert "MLflow tracking stopped" in warnings[0]["message"] and "127.0.0.1:9" in warnings[0]["data"]["mlflow_error"]
    result = json.loads((workdir / "result.json").read_text())
    assert result["status"] == "succeeded" and result["global_step"] == 2
    assert result["tracking"]["mlflow_run_id"] is None
    assert result["tracking"]["mlflow_error"] == warnings[0]["data"]["mlflow_error"]
    assert [s for s, _ in _scalars(workdir / "tensorboard")["train/loss"]] == [1, 2]  # TensorBoard unaffected
