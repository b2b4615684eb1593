"""Evaluation during training (issue 18): eval events, the best checkpoint exported, early stopping,
resume keeping the evaluation state."""

import json

import pytest
from safetensors.torch import load_file

from tests.helpers import make_spec
from trinity_core.errors import JobCancelled, SpecError
from trinity_core.train.eval_loop import EVAL_FILE, EvalState, choose_checkpoint
from trinity_core.pipeline import run_job
from trinity_core.spec import parse_spec
from trinity_core.train.trainer import checkpoints

NO_EXPORT = {"export.merge": False, "export.gguf": False, "export.evaluate": False}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.fixture(scope="module")
def overfit_files(tmp_path_factory):
    """A training set that shares its start with the eval set and then departs from it: every training
    answer ends in nonsense, the held-out answers in ordinary words. At a high learning rate the
    held-out loss falls while the model learns what they share, then climbs as it learns the nonsense."""
    root = tmp_path_factory.mktemp("overfit")
    train = _write_jsonl(root / "train.jsonl", [_chat(f"Tell me about item {i}.",
                                                      f"Item {i} is a zork zork zork zork.") for i in range(32)])
    held = _write_jsonl(root / "eval.jsonl", [_chat(f"Tell me about item {i}.", f"Item {i} is a small blue box.")
                                              for i in range(100, 108)])
    return train, held


OVERFIT_STEPS = 20
"""Long enough for the held-out curve to turn up on the CPUs seen: with 12 steps it turned at step 6
on one box and kept falling to step 12 on another (AMX/AVX-512-FP16, 2026-11-28: 6.47 6.07 5.92 6.82
6.32 5.88, then 6.16 6.01 6.05 6.06 to step 20)."""


def _overfit_spec(tiny_spec, files, **overrides):
    train, held = files
    spec = make_spec(tiny_spec, **{"train.learning_rate": 0.004, "train.warmup_steps": 0, "train.lr_scheduler": "constant",
                                   "train.eval_steps": 2, "train.save_steps": 100, "train.max_steps": OVERFIT_STEPS, **NO_EXPORT,
                                   **overrides})
    spec.data = spec.data.model_validate({"path": str(train), "eval_path": str(held)})
    return spec


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_recipe_run_evaluates_and_exports_its_best_step(trained_run):
    result, workdir, events = trained_run
    evals = [e for e in events if e.type == "eval"]
    every, total = result.resolved_spec["train"]["eval_steps"], result.global_step
    steps = list(range(every, total + 1, every))
    assert [e.data["step"] for e in evals] == steps and [h["step"] for h in result.eval_history] == steps
    for e, h in zip(evals, result.eval_history, strict=True):
        assert e.data["eval_loss"] == h["eval_loss"] > 0 and e.data["rows"] == h["rows"] >= 1
        assert e.data["seconds"] >= 0 and e.data["tokens"] > 0 and "eval loss" in e.message
    best = min(result.eval_history, key=lambda h: h["eval_loss"])
    assert result.best_step == best["step"] == result.checkpoint["step"] and result.checkpoint["checkpoint"] == "best"
    assert _same(_adapter(workdir / "adapter"), _adapter(workdir / "checkpoints" / f"step-{result.best_step}"))
    # each checkpoint of an evaluated step keeps its loss; the best one survives save_total_limit
    kept = dict(checkpoints(workdir / "checkpoints"))
    assert result.best_step in kept
    for step, path in kept.items():
        saved = json.loads((path / EVAL_FILE).read_text())
        assert saved["step"] == step and saved["eval_loss"] == next(
            (h["eval_loss"] for h in result.eval_history if h["step"] == step), None)
    on_disk = json.loads((workdir / "result.json").read_text())
    assert on_disk["eval_history"] == result.eval_history and on_disk["best_step"] == result.best_step
    assert on_disk["checkpoint"]["why"] and on_disk["early_stopping"] is None
    # the report scored the exported model: its fine-tuned loss is the best step's eval loss (same rows here)
    report = json.loads((workdir / "report" / "report.json").read_text())
    if report["held_out"]["rows"] == best["rows"]:
        assert report["models"]["fine_tuned"]["loss"] == pytest.approx(best["eval_loss"], abs=2e-3)
    assert report["training"]["eval_history"] == result.eval_history
    assert "Held-out loss during training" in (workdir / "report" / "report.md").read_text()


def test_best_is_a_step_before_the_last_when_the_eval_curve_turns_up(tiny_spec, overfit_files, tmp_path):
    events = []
    # the report (scoring only, no generations) scores the model that is exported
    result = run_job(_overfit_spec(tiny_spec, overfit_files, **{"export.evaluate": True, "export.eval_prompts": 0}),
                     tmp_path, events.append)
    losses = [h["eval_loss"] for h in result.eval_history]
    print("eval losses", losses)
    last_step = OVERFIT_STEPS
    assert result.global_step == last_step and [h["step"] for h in result.eval_history] == list(range(2, last_step + 1, 2))
    assert result.best_step < last_step and losses[-1] > min(losses), losses
    assert result.checkpoint == {"step": result.best_step, "checkpoint": "best", "eval_loss": min(losses),
                                 "why": result.checkpoint["why"]}
    assert f"at step {result.best_step}" in result.checkpoint["why"]
    best_dir = tmp_path / "checkpoints" / f"step-{result.best_step}"
    assert best_dir.is_dir()  # kept although older than the newest save_total_limit (2) checkpoints
    assert _same(_adapter(tmp_path / "adapter"), _adapter(best_dir))
    assert not _same(_adapter(tmp_path / "adapter"), _adapter(tmp_path / "checkpoints" / f"step-{last_step}"))
    # the best step's model, not the last's. Not to 1e-6: TRL trains the LoRA matrices of a
    # 4-bit model in bf16, and PEFT loads the checkpoint back in fp32 (seen: 5.919111 in training, 5.919479
    # for the same file loaded into a fresh model)
    assert result.report["models"]["fine_tuned"]["loss"] == pytest.approx(min(losses), abs=2e-3)
    assert any(e.message.startswith(f"exporting step {result.best_step} (best)") for e in events)
    assert [s for s, _ in checkpoints(tmp_path / "checkpoints")] == sorted({result.best_step, last_step - 2, last_step})

    # export.checkpoint = last: the final step, whatever the curve
    last = run_job(_overfit_spec(tiny_spec, overfit_files, **{"export.checkpoint": "last"}), tmp_path / "last")
    assert last.checkpoint["step"] == last_step and last.checkpoint["checkpoint"] == "last"
    assert [h["eval_loss"] for h in last.eval_history] == losses  # seeded: the same run
    assert _same(_adapter(tmp_path / "last" / "adapter"), _adapter(tmp_path / "last" / "checkpoints" / f"step-{last_step}"))
    assert [s for s, _ in checkpoints(tmp_path / "last" / "checkpoints")] == [last_step - 2, last_step]


def test_early_stopping_stops_and_a_rerun_does_not_train_on(tiny_spec, overfit_files, tmp_path):
    spec = _overfit_spec(tiny_spec, overfit_files, **{"train.max_steps": 40, "train.early_stopping_patience": 2})
    events = []
    result = run_job(spec, tmp_path, events.append)
    stop = result.early_stopping
    assert stop is not None and result.global_step == stop["step"] < 40
    assert stop["patience"] == 2 and stop["best_step"] == result.best_step and "2 evaluations" in stop["why"]
    assert [h["step"] for h in result.eval_history][-3:] == [result.best_step, result.best_step + 2, result.best_step + 4]
    assert max(e.data.get("step", 0) for e in events if e.type == "metrics") == stop["step"]
    assert any(e.message.startswith("early stopping at step") for e in events)
    assert json.loads((tmp_path / "result.json").read_text())["early_stopping"] == stop
    assert result.status == "succeeded" and result.checkpoint["step"] == result.best_step

    # killed after training (before the result): the rerun resumes the stopped run, it does not train on
    (tmp_path / "result.json").unlink()
    again_events = []
    again = run_job(spec, tmp_path, again_events.append)
    assert not [e for e in again_events if e.type in ("metrics", "eval")]
    assert again.global_step == result.global_step and again.eval_history == result.eval_history
    assert again.best_step == result.best_step and again.early_stopping == stop


def test_resume_keeps_the_eval_history_and_the_best_so_far(tiny_spec, overfit_files, tmp_path):
    spec = _overfit_spec(tiny_spec, overfit_files, **{"train.max_steps": 8})
    steps = []
    with pytest.raises(JobCancelled):
        run_job(spec, tmp_path, on_step=steps.append, should_stop=lambda: len(steps) >= 5)
    saved = EvalState.load(tmp_path / "checkpoints" / "step-5")
    assert [h["step"] for h in saved.history] == [2, 4] and saved.best_step in (2, 4) and saved.rows >= 1

    events = []
    result = run_job(spec, tmp_path, events.append)
    assert [e.data["step"] for e in events if e.type == "eval"] == [6, 8]
    assert [h["step"] for h in result.eval_history] == [2, 4, 6, 8]
    assert result.eval_history[:2] == saved.history
    assert result.best_step == min(result.eval_history, key=lambda h: h["eval_loss"])["step"]


def test_evaluation_off_exports_the_last_step_and_says_why(tiny_spec, tmp_path):
    spec = make_spec(tiny_spec, **{"train.eval_steps": 0, "train.max_steps": 2, **NO_EXPORT})
    events = []
    result = run_job(spec, tmp_path, events.append)
    assert not [e for e in events if e.type == "eval"] and result.eval_history == [] and result.best_step is None
    assert result.checkpoint["step"] == 2 and result.checkpoint["checkpoint"] == "last"
    assert "train.eval_steps = 0" in result.checkpoint["why"]
    assert not (tmp_path / "checkpoints" / "step-2" / EVAL_FILE).exists()


def test_spec_fields_and_their_checks():
    spec = parse_spec({})
    assert spec.train.eval_steps == 10 and spec.train.early_stopping_patience == 0 and spec.export.checkpoint == "best"
    assert spec.train.eval_max_rows == 32 and spec.train.eval_max_tokens == 512 and spec.train.eval_max_seconds == 120
    with pytest.raises(SpecError) as e:
        parse_spec({"train": {"eval_steps": 0, "early_stopping_patience": 2}})
    assert "train.early_stopping_patience needs train.eval_steps" in e.value.message
    with pytest.raises(SpecError) as e:
        parse_spec({"export": {"checkpoint": "first"}, "train": {"eval_steps": -1}})
    assert {p["loc"] for p in e.value.details} == {"export.checkpoint", "train.eval_steps"}


def test_choose_checkpoint_falls_back_to_the_last_step_when_the_best_is_gone(tmp_path):
    spec = parse_spec({})
    state = EvalState()
    state.record(10, {"eval_loss": 1.0, "rows": 2, "tokens": 9}, 0.1)
    state.record(20, {"eval_loss": 2.0, "rows": 2, "tokens": 9}, 0.1)
    assert state.best_step == 10 and state.since_best == 1
    (tmp_path / "step-10").mkdir()
    assert choose_checkpoint(spec, state, 20, tmp_path)["step"] == 10
    (tmp_path / "step-10").rmdir()
    gone = choose_checkpoint(spec, state, 20, tmp_path)
    assert gone["step"] == 20 and gone["checkpoint"] == "last" and "is gone" in gone["why"]
