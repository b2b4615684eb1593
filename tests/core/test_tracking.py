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
