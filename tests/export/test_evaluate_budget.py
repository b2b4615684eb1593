"""Evaluation inside a T4's budget, on CPU: capped rows/tokens/time, per-stage memory in the report,
and the merged checkpoint checked weight by weight against the trained model instead of loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.export.export_helpers import EVAL_ROWS, perturb_adapter
from trinity_core.evaluate import run as ev
from trinity_core.evaluate.budget import Caps, Clock, Stages
from trinity_core.export.merge import shard_files
from trinity_core.evaluate.merge_check import check_merged_weights


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "data" / "eval.jsonl").read_text().splitlines()]


def _count_forwards(model):
    calls = []
    handle = model.get_base_model().register_forward_hook(lambda *a: calls.append(1))  # under the PeftModel
    return calls, handle


def test_capped_rows_touch_only_that_many(exported, workdir, trained_model, tokenizer, tmp_path, monkeypatch):
    """2 of 6 rows, 32 tokens each (both rows are longer): only those rows are tokenised and run, by every model; the merged
    model is over the (lowered) size threshold, so it is checked weight by weight, not loaded."""
    seen = set()
    tokenize = ev.tokenize_conversation

    def spy(tok, messages, *args, **kwargs):
        seen.add(json.dumps(messages))
        return tokenize(tok, messages, *args, **kwargs)

    monkeypatch.setattr(ev, "tokenize_conversation", spy)
    monkeypatch.setattr(ev, "load_merged_model", lambda *a, **k: pytest.fail("merged model loaded"))
    calls, handle = _count_forwards(trained_model)
    try:
        report = ev.evaluate(tmp_path, trained_model=trained_model, tokenizer=tokenizer, eval_rows=_rows(workdir),
                             max_seq_length=256, merged_dir=workdir / "merged", eval_prompts=0,
                             gguf_files={"q4_k_m": workdir / "gguf" / "model-q4_k_m.gguf"},
                             caps=Caps(max_rows=2, max_tokens=32, max_seconds=600), merged_logits_max_bytes=0,
                             load_merged=lambda d: pytest.fail("merged model loaded"))
    finally:
        handle.remove()
    assert len(seen) == 2 and seen == {json.dumps(r["messages"]) for r in _rows(workdir)[:2]}
    assert len(calls) == 4  # base + fine-tuned, 2 rows each
    models = report["models"]
    assert set(models) == {"base", "fine_tuned", "gguf_q4_k_m"}
    assert {m["rows"] for m in models.values()} == {2} and not any(m["stopped_on_time"] for m in models.values())
    assert len({m["tokens"] for m in models.values()}) == 1 and 0 < models["base"]["tokens"] <= 2 * 31
    assert report["held_out"]["rows"] == 2
    assert report["caps"] == {"max_rows": 2, "max_tokens": 32, "max_seconds": 600, "rows_available": EVAL_ROWS,
                              "rows_capped": True, "rows_cut": 2, "stopped_on_time": [], "long_prompts_skipped": 0}
    assert "threshold" in report["skipped"]["merged"]
    weights = report["merged_weights"]
    assert weights["ok"] and weights["adapted"] == 42 and weights["max_abs_diff"] < 1e-4
    memory = report["memory"]
    assert memory["device"] == "cpu" and memory["gpu_peak_gib"] is None  # no CUDA here
    assert {"score base", "score fine_tuned", "score gguf_q4_k_m (CPU)", "check merged weights"} <= set(memory["stages"])
    assert all(s["host_peak_rss_gib"] > 0 and s["gpu_peak_gib"] is None for s in memory["stages"].values())
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["caps"] == report["caps"] and saved["memory"] == memory
    md = (tmp_path / "report" / "report.md").read_text()
    assert "caps: 2 rows of 6, 32 tokens a row" in md and "merged not scored" in md and "all match" in md


def test_time_cap_scores_one_row_per_model(exported, workdir, trained_model, tokenizer, tmp_path):
    report = ev.evaluate(tmp_path, trained_model=trained_model, tokenizer=tokenizer, eval_rows=_rows(workdir),
                         max_seq_length=256, eval_prompts=3, max_new_tokens=2,
                         gguf_files={"q4_k_m": workdir / "gguf" / "model-q4_k_m.gguf"},
                         caps=Caps(max_rows=6, max_tokens=256, max_seconds=1e-9))
    assert {m["rows"] for m in report["models"].values()} == {1}
    assert report["caps"]["stopped_on_time"] == ["base", "fine_tuned", "gguf_q4_k_m", "generations"]
    assert len(report["generations"]) == 1


def test_clock_shares_what_is_left():
    t = [0.0]
    clock = Clock(90, 3, now=lambda: t[0])
    assert clock.share() == 30  # 90 s over 3 tasks
    t[0] = 10  # the first task used 10 of its 30 s: the other two share the 80 left
    assert clock.share() == 50 and clock.share() == 90  # t=10 still: 40 s each, then all 80


def test_stages_record_the_gpu_peak_of_each_stage(monkeypatch):
    """With CUDA: each stage resets the peak and reads max_memory_allocated (faked here)."""
    peaks = iter([3 * 2**30, 5 * 2**30])
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))
    stages = Stages()
    for name in ("load", "score"):
        with stages(name):
            pass
    summary = stages.summary(training_peak_gib=12.2)
    assert len(resets) == 2 and [s["gpu_peak_gib"] for s in summary["stages"].values()] == [3.0, 5.0]
    assert summary["gpu_peak_gib"] == 5.0 and summary["within_training_peak"] is True
    assert stages.summary(training_peak_gib=4.0)["within_training_peak"] is False


def _corrupt(merged_dir, out, pick):
    """A copy of ``merged_dir`` with one tensor (the first key ``pick`` accepts) changed."""
    shutil.copytree(merged_dir, out)
    for shard in shard_files(out):
        tensors = load_file(shard)
        key = next((k for k in tensors if pick(k)), None)
        if key is not None:
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] += 0.01 + tensors[key].view(-1)[0].abs() * 0.05
            save_file(tensors, shard, metadata={"format": "pt"})
            return key
    raise AssertionError("no tensor picked")


def test_weight_check_finds_a_changed_weight(exported, workdir, trained_model, tmp_path):
    assert check_merged_weights(trained_model, workdir / "merged")["ok"]
    key = _corrupt(workdir / "merged", tmp_path / "bad", lambda k: k.endswith("layers.3.mlp.down_proj.weight"))
    result = check_merged_weights(trained_model, tmp_path / "bad")
    assert not result["ok"] and [m["tensor"] for m in result["mismatches"]] == [key]
    assert result["mismatches"][0]["bad_elements"] == 1


@pytest.fixture(scope="module")
def mm4_merge(tmp_path_factory):
    """The pre-quantised multimodal stand-in, a non-trivial adapter, merged: (base, workdir)."""
    from trinity_core.train.backends.peft import PeftBackend
    from trinity_core.export.run import quant_of
    from trinity_core.export.merge import merge_adapter
    from trinity_core.spec import JobSpec
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

    root = tmp_path_factory.mktemp("mm4-check")
    base = build_multimodal_model(root / "base", quantized=True)
    spec = JobSpec.model_validate({"model": {"name_or_path": str(base), "max_seq_length": 64},
                                   "lora": {"r": 8, "alpha": 16}})
    model, _ = PeftBackend().load(spec)
    perturb_adapter(model)
    model.save_pretrained(root / "adapter")
    del model
    merge_adapter(root / "adapter", root / "merged", base_model=str(base), quant=quant_of(spec))
    return base, root


def test_weight_check_covers_the_vision_tower_of_the_prequantised_base(mm4_merge, tmp_path):
    base, root = mm4_merge
    model = ev.load_trained_model(base, root / "adapter")
    keys = [k for shard in shard_files(root / "merged") for k in load_file(shard)]
    result = check_merged_weights(model, root / "merged")
    assert result["ok"] and result["tensors"] == len(keys) and result["adapted"] == 42
    assert any(k.startswith("vision_tower.") for k in keys)
    key = _corrupt(root / "merged", tmp_path / "bad", lambda k: k.startswith("vision_tower.") and k.endswith("fc1.weight"))
    bad = check_merged_weights(model, tmp_path / "bad")
    assert not bad["ok"] and [m["tensor"] for m in bad["mismatches"]] == [key]


def test_a_gguf_larger_than_free_ram_is_not_loaded(exported, workdir, trained_model, tokenizer, tmp_path, monkeypatch):
    """llama.cpp maps the whole file: one that does not fit the host RAM free now (a cgroup's limit
    included) is neither scored nor used for generation, and the report says why; one that fits is."""
    q4 = workdir / "gguf" / "model-q4_k_m.gguf"
    f16 = workdir / "gguf" / "model-f16.gguf"
    free = q4.stat().st_size + ev.GGUF_RAM_MARGIN  # room for the q4_k_m, not for the larger f16
    assert f16.stat().st_size > q4.stat().st_size
    loaded = []
    real_llama = __import__("llama_cpp").Llama
    monkeypatch.setattr("llama_cpp.Llama", lambda model_path, **kw: loaded.append(model_path) or real_llama(
        model_path=model_path, **kw))
    report = ev.evaluate(tmp_path, trained_model=trained_model, tokenizer=tokenizer, eval_rows=_rows(workdir),
                         max_seq_length=256, eval_prompts=1, max_new_tokens=2,
                         gguf_files={"f16": f16, "q4_k_m": q4}, caps=Caps(max_rows=1, max_tokens=32),
                         free_ram=lambda: free)
    assert set(report["models"]) == {"base", "fine_tuned", "gguf_q4_k_m"}
    why = report["skipped"]["gguf_f16"]
    assert why.startswith("model-f16.gguf: ") and "GiB of host RAM free" in why
    assert loaded and all(p.endswith("model-q4_k_m.gguf") for p in loaded)  # scored and generated with
    assert "gguf_f16 not scored" in (tmp_path / "report" / "report.md").read_text()

    loaded.clear()
    report = ev.evaluate(tmp_path, trained_model=trained_model, tokenizer=tokenizer, eval_rows=_rows(workdir),
                         max_seq_length=256, eval_prompts=1, max_new_tokens=2, gguf_files={"q4_k_m": q4},
                         caps=Caps(max_rows=1, max_tokens=32), free_ram=lambda: free - 1)
    assert set(report["models"]) == {"base", "fine_tuned"} and not loaded
    assert set(report["skipped"]) == {"gguf_q4_k_m", "generations gguf_q4_k_m"}
