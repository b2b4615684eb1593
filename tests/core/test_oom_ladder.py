"""The ladder's logic (pure) and its walk through run_job under the injected-OOM test seam
(``RunOptions(test_seams=True, inject_oom=N)``: the first N attempts raise an OOM at their first
step, whatever their settings). What each attempt trained is read from the loaded model and the
saved adapter, so a rung whose settings never reached training fails here."""

import json

import pytest
import torch

from tests.helpers import make_spec
from trinity_core import gpu
from trinity_core.errors import OOMLadderExhausted
from trinity_core.options import RunOptions
from trinity_core.pipeline import run_job
from trinity_core.spec import JobSpec
from trinity_core.train import ladder


def seams(ooms: int) -> RunOptions:
    return RunOptions(test_seams=True, inject_oom=ooms)


def test_rungs_in_seed_order_and_cumulative():
    rungs = ladder.rungs(JobSpec())
    assert [r.name for r in rungs] == ["recipe", "seq_2048", "r_32", "dora_off", "targets_qv"]
    last = rungs[-1].settings
    assert (last.max_seq_length, last.r, last.use_dora, last.target_modules) == (2048, 32, False, ("q_proj", "v_proj"))
    assert rungs[2].settings.max_seq_length == 2048  # r_32 keeps seq_2048's cut


def test_noop_rungs_are_skipped():
    spec = JobSpec.model_validate({"model": {"max_seq_length": 1024}, "lora": {"r": 16, "use_dora": False}})
    assert [r.name for r in ladder.rungs(spec)] == ["recipe", "targets_qv"]


def test_disabled_ladder_has_one_rung():
    assert len(ladder.rungs(JobSpec.model_validate({"ladder": {"enabled": False}}))) == 1


def test_is_oom_matches_only_memory_errors():
    assert ladder.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert ladder.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not ladder.is_oom(ValueError("out of memory"))
    assert not ladder.is_oom(RuntimeError("shape mismatch"))


def _ladder_spec(tiny_spec):
    # seq 4096 and r 64 so that every rung of the seed's ladder changes something; 2 steps are enough.
    return make_spec(tiny_spec, **{"model.max_seq_length": 4096, "lora.r": 64, "train.max_steps": 2, "train.save_steps": 100,
                                   "export.merge": False, "export.gguf": False, "export.evaluate": False})


def test_ladder_walks_the_rungs_in_order(tiny_spec, tmp_path):
    spec = _ladder_spec(tiny_spec)
    all_targets = sorted(spec.lora.target_modules)
    assert spec.lora.use_dora and len(all_targets) > 2  # every rung changes what is trained
    events = []
    result = run_job(spec, tmp_path, events.append, options=seams(3))
    assert [(a["rung"], a["outcome"]) for a in result.attempts] == [
        ("recipe", "oom"), ("seq_2048", "oom"), ("r_32", "oom"), ("dora_off", "ok")]
    # what each attempt built: the LoRA layers of the loaded model
    assert [a["extra"]["adapter"] for a in result.attempts] == [
        {"r": [64], "use_dora": True, "target_modules": all_targets},
        {"r": [64], "use_dora": True, "target_modules": all_targets},
        {"r": [32], "use_dora": True, "target_modules": all_targets},
        {"r": [32], "use_dora": False, "target_modules": all_targets}]
    # what was trained and saved: the adapter of the last rung
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["use_dora"], sorted(saved["target_modules"])) == (32, False, all_targets)
    assert result.final_rung == "dora_off"
    assert result.final_settings == {"max_seq_length": 2048, "r": 32, "use_dora": False,
                                     "target_modules": list(tiny_spec.lora.target_modules)}
    assert result.resolved_spec["lora"]["r"] == 32 and result.resolved_spec["lora"]["use_dora"] is False
    downgrades = [e for e in events if e.level == "warning"]
    assert [e.data["rung"] for e in downgrades] == ["seq_2048", "r_32", "dora_off"]
    assert all(e.type == "ladder" for e in downgrades)
    # the ladder's last event carries the whole attempt list (what the worker copies onto the row)
    last = [e for e in events if e.type == "ladder"][-1]
    assert last.data["attempts"] == result.attempts
    assert all("injected" in a["error"] for a in result.attempts[:3])
    assert result.global_step == 2
    # the rung that trained evaluated too (its last step), on eval rows cut to its max_seq_length
    evals = [e for e in events if e.type == "eval"]
    assert [e.data["step"] for e in evals] == [2] and evals[0].seq > downgrades[-1].seq
    assert [h["step"] for h in result.eval_history] == [2] and result.best_step == 2


def test_targets_qv_trains_only_q_and_v(tiny_spec, tmp_path):
    """The last rung: LoRA on q_proj and v_proj only (DoRA off, r 32, seq 2048 kept)."""
    result = run_job(_ladder_spec(tiny_spec), tmp_path, options=seams(4))
    assert result.final_rung == "targets_qv"
    assert result.attempts[-1]["extra"]["adapter"] == {"r": [32], "use_dora": False,
                                                       "target_modules": ["q_proj", "v_proj"]}
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["use_dora"], sorted(saved["target_modules"])) == (32, False, ["q_proj", "v_proj"])


def test_injecting_ooms_needs_the_test_seams():
    with pytest.raises(ValueError, match="test_seams"):
        RunOptions(inject_oom=1)
    assert RunOptions(test_seams=True, inject_oom=1).inject_oom == 1


def test_exhausted_ladder_fails_clearly(tiny_spec, tmp_path):
    with pytest.raises(OOMLadderExhausted) as e:
        run_job(_ladder_spec(tiny_spec), tmp_path, options=seams(5))
    assert e.value.code == "oom_ladder_exhausted"
    assert [a["rung"] for a in e.value.details] == ["recipe", "seq_2048", "r_32", "dora_off", "targets_qv"]
    assert all(a["outcome"] == "oom" for a in e.value.details)
    assert "targets_qv (oom)" in e.value.message


def test_memory_kept_by_a_failed_attempt_sends_the_job_to_a_fresh_process(tiny_spec, tmp_path, monkeypatch):
    """On the GPU, Unsloth kept ~5.7 GiB of an attempt that hit a genuine OOM (docs/BENCHMARKS.md).
    Here ``gpu.allocated_gib`` reports memory still held. The job stops with a retryable
    ``gpu_memory_not_released`` whose progress points at the next rung; run again (as the worker
    does, in a fresh process) it resumes there and finishes."""
    from trinity_core.errors import GpuMemoryNotReleased

    monkeypatch.setattr(gpu, "allocated_gib", lambda: 5.7)
    spec = _ladder_spec(tiny_spec)
    with pytest.raises(GpuMemoryNotReleased) as e:
        run_job(spec, tmp_path, options=seams(1))
    assert e.value.retryable and e.value.code == "gpu_memory_not_released"
    assert e.value.details["next_rung"] == "seq_2048" and e.value.details["leftover_gib"] == 5.7
    assert "5.7 GiB stayed allocated" in e.value.message
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["rung_index"] == 1 and [a["outcome"] for a in progress["attempts"]] == ["oom"]

    monkeypatch.setattr(gpu, "allocated_gib", lambda: 0.0)  # the fresh process holds nothing
    result = run_job(spec, tmp_path, options=seams(1))
    assert [(a["rung"], a["outcome"]) for a in result.attempts] == [("recipe", "oom"), ("seq_2048", "ok")]
    assert result.final_rung == "seq_2048"
