"""The lean Gemma-3 RMSNorm of Unsloth's float32 mode (trinity_core.train.lean_norm): Unsloth's values
forward, autograd's gradients backward, and nothing of (tokens × hidden) size kept in fp32."""

from __future__ import annotations

import pytest
import torch

from trinity_core.train import lean_norm
from trinity_core.train.lean_norm import FP16_MAX, Float32RMSNorm, patch_gemma3_norms


def unsloth_float32_norm(x, weight, eps):
    """Unsloth's ``_gemma3_rms_norm_float32`` (unsloth_zoo 2026.10.9, temporary_patches/gemma.py)."""
    x_fp32 = x.to(torch.float32)
    variance = x_fp32.pow(2).mean(-1, keepdim=True)
    hidden_states_fp32 = x_fp32 * torch.rsqrt(variance + eps)
    output_fp32 = hidden_states_fp32 * (1.0 + weight.to(torch.float32))
    return torch.clamp(output_fp32, min=-FP16_MAX, max=FP16_MAX).to(torch.float16)


def _inputs(dtype, overflow=False):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 7, 48, generator=gen)).to(dtype)
    weight = 0.5 * torch.randn(48, generator=gen)
    if overflow:  # rows that stay near the clamp: a huge gain on a few features
        weight[:5] = 1e5
    return x, weight


@pytest.mark.parametrize("chunk", [1 << 22, 48 * 3], ids=["one_block", "blocks_of_3_rows"])
@pytest.mark.parametrize("overflow", [False, True], ids=["in_range", "clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_same_values_as_unsloth_and_autograds_gradients(dtype, overflow, chunk, monkeypatch):
    monkeypatch.setattr(lean_norm, "CHUNK_ELEMENTS", chunk)
    x, weight = _inputs(dtype, overflow)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = Float32RMSNorm.apply(xa, wa, 1e-6)
    ref = unsloth_float32_norm(xb, wb, 1e-6)
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    if overflow:
        assert (ref.abs() == FP16_MAX).any(), "some outputs were clamped (the test can fail)"
    out.backward(dout)
    ref.backward(dout)
    for name, got, want in (("x", xa.grad, xb.grad), ("weight", wa.grad, wb.grad)):
        assert got.dtype == want.dtype
        finite = torch.isfinite(want)  # fp16 gradients through a 1e5 gain overflow, on both sides alike
        assert torch.equal(torch.isfinite(got), finite) and finite.float().mean() > 0.5
        got, want = got[finite].double(), want[finite].double()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err < (2e-3 if got.dtype == torch.float16 else 2e-6), f"{name}: {err:.2e}"


def test_keeps_no_float32_copy_of_the_activations():
    """For an fp16 input autograd keeps its fp32 copy and the fp32 product before the clamp (2 ×
    tokens × hidden fp32); the lean norm keeps x itself and one scale a row."""
    x, weight = _inputs(torch.float16)
    x.requires_grad_()

    def saved_by(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x, weight, 1e-6)
        return [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]

    assert len(saved_by(unsloth_float32_norm)) >= 2
    assert saved_by(Float32RMSNorm.apply) == []


def test_patch_only_in_unsloths_float32_mode(monkeypatch):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM

    config = Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, vocab_size=64)
    model = Gemma3ForCausalLM(config)
    norms = [m for m in model.modules() if type(m).__name__ == "Gemma3RMSNorm"]
    monkeypatch.delenv("UNSLOTH_FORCE_FLOAT32", raising=False)
    assert patch_gemma3_norms(model) == 0 and not any("forward" in m.__dict__ for m in norms)
    monkeypatch.setenv("UNSLOTH_FORCE_FLOAT32", "1")
    assert patch_gemma3_norms(model) == len(norms) == 2 * 4 + 2 * 2 + 1  # 4 a layer, q/k norms, final
    x, norm = torch.randn(1, 3, 32), model.model.layers[0].input_layernorm
    assert torch.equal(norm(x), unsloth_float32_norm(x, norm.weight, norm.eps))
    assert patch_gemma3_norms(model) == 0, "already patched"
