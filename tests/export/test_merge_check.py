"""The merged-weights check's two allowances (``merge_check`` docstring) and the merge's load-dtype
detection (``merge.quantized_in``), on the export fixtures' tiny fp32 Gemma-3.

What the GPU runs found (bench/results/2026-11-28-h200-merge_diag-1.jsonl): under Unsloth's T4 path
the trained model holds the fp32 stand-in's untouched tensors rounded to 16 bits, and a 16-bit base
was quantised in bf16 although fp16 was asked for, its layers then relabelled fp16."""

from __future__ import annotations

import pytest
import torch

from trinity_core.evaluate.merge_check import check_merged_weights, rounded_at_load


def test_a_tensor_rounded_at_load_matches_and_is_counted(trained_model, exported, workdir):
    """The embedding (random fp32 values, not 16-bit ones) rounded to fp16 as a T4 load would: counted,
    not a mismatch; moved by 1e-3 instead: a mismatch."""
    weight = trained_model.get_base_model().model.embed_tokens.weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(1e-3)
            moved = check_merged_weights(trained_model, workdir / "merged")
            assert not moved["ok"] and moved["mismatched_tensors"] == 1 and moved["rounded_at_load"] == {}
            weight.copy_(kept.to(torch.float16).float())
            assert not torch.equal(weight, kept)
        result = check_merged_weights(trained_model, workdir / "merged")
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert result["ok"], result
    assert result["rounded_at_load"] == {"float16": 1}


def test_rounding_is_only_accepted_exactly_and_from_wider_storage():
    stored = torch.randn(64) * 0.1
    assert rounded_at_load(stored.to(torch.bfloat16).float(), stored) == "bfloat16"
    assert rounded_at_load(stored.to(torch.float16).float(), stored) == "float16"
    assert rounded_at_load(stored.to(torch.float16).float() + 1e-7, stored) is None
    assert rounded_at_load(stored.to(torch.float16).float(), stored.to(torch.float16)) is None  # no wider original


def test_the_delta_is_the_float64_product_rounded_once(trained_model):
    """TF32 cannot touch a float64 product (the GPU runs had it on); checked here against the float64
    reference, rounded to fp32 once."""
    from trinity_core.evaluate.merge_check import delta_weight

    module = trained_model.get_base_model().model.layers[0].mlp.down_proj
    adapter = trained_model.active_adapter
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    got = delta_weight(module, adapter)
    assert got.dtype == torch.float32
    want = (b.double() @ a.double()).float() * module.scaling[adapter]
    assert torch.equal(got, want)


@pytest.mark.parametrize("load_dtype", ["float32", "bfloat16"])
def test_quantized_in_finds_the_dtype_the_load_quantised_in(sharded_base, load_dtype):
    """Loaded in bf16 and relabelled fp16 (what Unsloth did on the H200), the fp32 base is found to
    have been quantised in bf16; loaded in fp32, in fp32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trinity_core.export.merge import quantized_in

    dtype = getattr(torch, load_dtype)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(sharded_base, quantization_config=bnb, dtype=dtype)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = torch.float16
    assert quantized_in(model, sharded_base) == load_dtype


def test_quantized_in_is_none_for_a_prequantized_base(tmp_path, sharded_base, monkeypatch):
    """Decided from the base's config, before any shard is read (a 4-bit model is at hand)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import trinity_core.export.merge as merge
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

    base = build_multimodal_model(tmp_path / "base", quantized=True)
    model = AutoModelForCausalLM.from_pretrained(sharded_base, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)

    def no_shards(src):
        raise AssertionError(f"read the shards of {src}")

    monkeypatch.setattr(merge, "shard_files", no_shards)
    assert merge.quantized_in(model, base) is None
    with pytest.raises(AssertionError, match="read the shards"):
        merge.quantized_in(model, sharded_base)  # a 16-bit base: its shards are read
