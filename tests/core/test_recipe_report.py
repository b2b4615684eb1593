"""The session's recipe run (tests/conftest.py ``trained_run``): its report's merged-weights check.

TRL keeps a QLoRA adapter's A and B in bf16; the check once took PEFT's ``get_delta_weight``, which
rounds s·B@A to bf16, and so warned "42 mismatched" on every tiny run although the fp32 merge was
exact (bench/results/2026-11-28-cpu-tiny_pipeline-rerun.txt)."""

from __future__ import annotations


def test_the_merged_checkpoint_equals_the_trained_model(trained_run):
    result, _, events = trained_run
    weights = result.report["merged_weights"]
    assert weights["ok"] and weights["adapted"] == 42 and weights["max_abs_diff"] <= 1e-6, weights
    assert not [e for e in events if e.level == "warning" and "merged weights" in e.message]


def test_trinity_train_prints_the_verdict_and_the_exported_step(trained_run, tmp_path, monkeypatch, capsys):
    """`trinity train`'s summary, from the session's real result (run_job itself is not re-run)."""
    import trinity_core.pipeline as pipeline
    from cli import main

    result, workdir, _ = trained_run
    monkeypatch.setattr(pipeline, "run_job", lambda *a, **k: result)
    assert main(["train", "examples/tiny.yaml", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "verdict: The fine-tune beat the base on this data" in out
    assert f"exported: step {result.checkpoint['step']}" in out and "eval loss:" in out
