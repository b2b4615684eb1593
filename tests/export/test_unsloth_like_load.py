"""The whole job on CPU with the base loaded the way Unsloth loaded it on the H200 (T4 path, fp16 asked):
quantised in bf16, then every 16-bit tensor upcast to fp32 and the 4-bit layers relabelled to
dequantise in fp32 (bench/results/2026-11-28-h200-merge_diag-1.jsonl). The spec says fp32, so only
``merge.quantized_in`` tells the merge to re-quantise in bf16; and the untouched tensors the model
holds are the fp32 stand-in's values rounded to bf16, which the check must count, not fail.
Unsloth itself needs CUDA (tests/gpu/test_unsloth_multimodal.py); this is its load, emulated through the
PEFT backend (the test seam is ``PeftBackend.load``)."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _like_unsloth(load):
    """``PeftBackend.load`` loading in bf16, then upcasting to fp32 compute as Unsloth's T4 path does."""

    def wrapped(self, spec, tokenizer=None):
        import trinity_core.train.backends.peft as peft_backend

        chosen = peft_backend.compute_dtype
        peft_backend.compute_dtype = lambda spec: torch.bfloat16
        try:
            model, tokenizer = load(self, spec, tokenizer)
        finally:
            peft_backend.compute_dtype = chosen
        for module in model.modules():
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            if state is not None:
                state.dtype = torch.float32
                module.compute_dtype = torch.float32
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        self._info["compute_dtype"] = "float32"
        return model, tokenizer

    return wrapped


def _run(tmp_path, monkeypatch):
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec
    from trinity_core.train.backends.peft import PeftBackend

    monkeypatch.setattr(PeftBackend, "load", _like_unsloth(PeftBackend.load))
    base = build_multimodal_model(tmp_path / "base", quantized=False)
    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    spec.model.name_or_path, spec.model.compute_dtype = str(base), "float32"
    spec.train.max_steps, spec.train.save_steps, spec.train.learning_rate = 2, 2, 0.01
    spec.export.gguf = False  # the GGUF pair is the multimodal tests' (test_multimodal.py)
    spec.export.eval_prompts, spec.export.max_new_tokens = 1, 4
    events = []
    return run_job(spec, tmp_path / "run", events.append), events


def test_a_16bit_base_quantised_in_bf16_merges_and_checks_exactly(tmp_path, monkeypatch):
    result, events = _run(tmp_path, monkeypatch)
    merge = result.export["merge"]
    assert merge["quant"]["dtype"] == "bfloat16" and merge["quant"]["dequant_dtype"] == "float32"
    assert merge["quant"]["device"] == "cpu"  # the trained model's 4-bit layers: where the merge quantises
    assert any(e.data.get("quantized_in") == "bfloat16" for e in events)
    checked = result.report["merged_weights"]
    assert checked["ok"], {k: checked.get(k) for k in ("mismatches", "missing_adapted", "rounded_at_load")}
    assert checked["adapted"] == 42 and checked["rounded_at_load"].get("bfloat16", 0) > 0


def test_without_the_detection_the_check_catches_the_requantisation(tmp_path, monkeypatch):
    """The merge re-quantising in the spec's fp32 instead: every adapted tensor is off, and the check says so."""
    import trinity_core.export.merge as merge

    monkeypatch.setattr(merge, "quantized_in", lambda *args, **kwargs: None)
    result, _ = _run(tmp_path, monkeypatch)
    assert result.export["merge"]["quant"]["dtype"] == "float32"
    checked = result.report["merged_weights"]
    assert not checked["ok"] and checked["mismatched_tensors"] >= 42
