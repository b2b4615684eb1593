"""The lean Gemma-3 attention of Unsloth's float32 mode (trinity_core.train.lean_attention): Unsloth's
values forward, the same gradients backward, and only the core's inputs kept between the two."""

from __future__ import annotations

import pytest
import torch

from trinity_core.train import lean_attention
from trinity_core.train.lean_attention import CoreShape, RecomputedCore, gqa_sdpa, patch_gemma3_attention

FP16_MAX = torch.finfo(torch.float16).max


def unsloth_prepare(q16, k16, v16, qshape, kvshape, cos, sin, mask, q_norm, k_norm):
    """unsloth_zoo 2026.10.9 temporary_patches/gemma.py, ``patch_Gemma3Attention``'s ``prepare`` (eager,
    as under UNSLOTH_COMPILE_DISABLE), with its inline ``_gemma3_rms_norm``: copied, not imported."""
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    def rms(x, weight, eps):
        x_fp32 = x.to(torch.float32)
        variance = x_fp32.pow(2).mean(-1, keepdim=True)
        hidden_states_fp32 = x_fp32 * torch.rsqrt(variance + eps)
        return (hidden_states_fp32 * (1.0 + weight.to(torch.float32))).to(torch.float32)

    q = q16.view(qshape).to(torch.float32).transpose(1, 2)
    k = k16.view(kvshape).to(torch.float32).transpose(1, 2)
    v = v16.view(kvshape).to(torch.float32).transpose(1, 2)
    qn = torch.clamp(rms(q, *q_norm), min=-FP16_MAX, max=FP16_MAX).to(torch.float16)
    kn = torch.clamp(rms(k, *k_norm), min=-FP16_MAX, max=FP16_MAX).to(torch.float16)
    q, k = apply_rotary_pos_emb(qn.to(torch.float32), kn.to(torch.float32), cos=cos.to(torch.float32),
                                sin=sin.to(torch.float32))
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        mask = mask.to(torch.float32)
    return q.contiguous(), k.contiguous(), v.contiguous(), mask


def unsloth_core(q16, k16, v16, cos, sin, q_weight, k_weight, mask, shape: CoreShape):
    """``forward_function`` after the projections: prepare, SDPA (``gqa_sdpa`` off CUDA is plain SDPA with
    grouped heads), the transpose and the forced fp16 output."""
    bsz, q_len = q16.shape[:2]
    q, k, v, mask = unsloth_prepare(q16, k16, v16, (bsz, q_len, shape.heads, shape.head_dim),
                                    (bsz, q_len, shape.kv_heads, shape.head_dim), cos, sin, mask,
                                    (q_weight, shape.q_eps), (k_weight, shape.k_eps))
    is_causal = q.shape[2] > 1 and mask is None and shape.causal
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal,
                                                           scale=shape.scale, enable_gqa=shape.heads != shape.kv_heads)
    return out.transpose(1, 2).contiguous().reshape(bsz, q_len, -1).to(torch.float16)


def _inputs(mask_kind: str, seq: int = 11, kv_heads: int = 2, dim: int = 16):
    heads = 2 * kv_heads
    gen = torch.Generator().manual_seed(0)
    q16 = (2 * torch.randn(2, seq, heads * dim, generator=gen)).half()
    k16 = (2 * torch.randn(2, seq, kv_heads * dim, generator=gen)).half()
    v16 = torch.randn(2, seq, kv_heads * dim, generator=gen).half()
    angles = torch.arange(seq)[:, None] * (1e-2 * torch.arange(dim // 2))[None, :]
    emb = torch.cat((angles, angles), -1)[None].expand(2, -1, -1)
    cos, sin = emb.cos(), emb.sin()
    q_weight, k_weight = 0.3 * torch.randn(dim, generator=gen), 0.3 * torch.randn(dim, generator=gen)
    pos = torch.arange(seq)
    mask = {"causal": None,
            "window": ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 4))[None, None],
            "float": torch.where(pos[None, :] <= pos[:, None], 0.0, -1e4)[None, None].half(),
            "per_head": (pos[None, None, :] <= pos[None, :, None] + torch.arange(heads)[:, None, None])[None]
            }[mask_kind]
    shape = CoreShape(heads, kv_heads, dim, 1e-6, 1e-6, dim ** -0.5, True, gqa_sdpa)
    return [q16, k16, v16, cos, sin, q_weight, k_weight, mask], shape


@pytest.mark.parametrize("groups", [1, 2, 3], ids=lambda g: f"{g}_head_groups")
@pytest.mark.parametrize("mask_kind", ["causal", "window", "float", "per_head"])
def test_same_values_and_gradients_as_unsloths_core(mask_kind, groups, monkeypatch):
    """Bit for bit, with backward in one pass or a group of heads at a time (3 groups of 3 key/value
    heads: 1 each; a mask with an entry per query head is cut along with the heads), but for the norm
    weights' gradients in groups (sums in another order)."""
    monkeypatch.setattr(lean_attention, "HEAD_GROUPS", groups)
    tensors, shape = _inputs(mask_kind, kv_heads=3 if groups == 3 else 2)
    lean = [t.clone().requires_grad_(i < 3 or i in (5, 6)) if t is not None else None for i, t in enumerate(tensors)]
    ref = [t.clone().requires_grad_(i < 3 or i in (5, 6)) if t is not None else None for i, t in enumerate(tensors)]
    out, want = RecomputedCore.apply(*lean, shape), unsloth_core(*ref, shape)
    assert out.dtype == torch.float16 and out.shape == tensors[0].shape and torch.equal(out, want)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half()
    out.backward(dout)
    want.backward(dout)
    for i in (0, 1, 2, 5, 6):
        assert lean[i].grad is not None and lean[i].grad.abs().sum() > 0
        if i < 5 or groups == 1:
            assert torch.equal(lean[i].grad, ref[i].grad), f"gradient of input {i}"
        else:  # a norm weight's gradient (frozen under LoRA) is summed over the groups: another order
            torch.testing.assert_close(lean[i].grad, ref[i].grad, rtol=1e-5, atol=1e-5 * ref[i].grad.abs().max())


def test_keeps_only_its_inputs():
    """Unsloth's core keeps fp32 copies of q and k at several stages, the repeated heads and the fp32
    output; the lean core keeps the tensors it was given."""
    tensors, shape = _inputs("window")
    tensors = [t.requires_grad_() if i < 3 else t for i, t in enumerate(tensors)]

    def saved_by(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(*tensors, shape)
        return saved

    inputs = {t.data_ptr() for t in tensors if t is not None}
    assert sum(t.dtype == torch.float32 and t.numel() >= tensors[0].numel() for t in saved_by(unsloth_core)) >= 4
    lean = saved_by(RecomputedCore.apply)
    assert lean and all(t.data_ptr() in inputs for t in lean), [(t.dtype, tuple(t.shape)) for t in lean]


def _tiny_model(layers: int = 2):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=64, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"][:layers],
                              attn_implementation="sdpa")
    return Gemma3ForCausalLM(config).half()


def unsloth_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Unsloth's float32-mode ``forward_function`` for a training call (no cache, SDPA), with the
    projections and the mask preparation it does around the core."""
    shape = CoreShape(self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim,
                      self.q_norm.eps, self.k_norm.eps, self.scaling, True, gqa_sdpa)
    q16, k16, v16 = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    bsz, q_len = hidden_states.shape[:2]
    mask = lean_attention.sdpa_mask(attention_mask, q16.new_empty(bsz, shape.heads, q_len, 0),
                                    q16.new_empty(bsz, shape.kv_heads, q_len, 0), self.sliding_window)
    core = unsloth_core(q16, k16, v16, *position_embeddings, self.q_norm.weight, self.k_norm.weight, mask, shape)
    return self.o_proj(core), None


def test_a_training_step_through_the_model_matches_unsloths_attention(monkeypatch):
    """Loss and every gradient of a tiny fp16 Gemma-3 with gradient checkpointing: the lean attention
    against the same model whose attentions run Unsloth's forward (copied above)."""
    import types

    monkeypatch.setenv("UNSLOTH_FORCE_FLOAT32", "1")
    lean, ref = _tiny_model(), _tiny_model()
    assert patch_gemma3_attention(lean) == 2
    for module in ref.modules():
        if type(module).__name__ == "Gemma3Attention":
            module.forward = types.MethodType(unsloth_attention_forward, module)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    calls, core = [], lean_attention.attention_core
    monkeypatch.setattr(lean_attention, "attention_core", lambda *a: calls.append(torch.is_grad_enabled()) or core(*a))
    losses = []
    for model in (lean, ref):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    # checkpointing: per layer the forward, its recompute, then the core again in backward, once for each
    # of the 2 groups of heads (1 key/value head each)
    assert calls.count(True) == 2 * 2 and calls.count(False) == 2 * 2, calls
    for (name, a), (_, b) in zip(lean.named_parameters(), ref.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is None:
            continue
        if name.endswith(("q_norm.weight", "k_norm.weight")):  # summed over the groups: another order
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-3, atol=2e-3 * b.grad.abs().max().item(), msg=name)
        else:
            assert torch.equal(a.grad, b.grad), name


def test_unsloths_forward_runs_outside_training_shaped_calls(monkeypatch):
    monkeypatch.setenv("UNSLOTH_FORCE_FLOAT32", "1")
    model = _tiny_model(1)
    attention = model.model.layers[0].self_attn
    seen = []
    monkeypatch.setattr(type(attention), "forward", lambda self, *a, **k: seen.append(k) or ("unsloth", None))
    assert patch_gemma3_attention(model) == 1 and patch_gemma3_attention(model) == 0, "patched once"
    hidden = torch.randn(1, 5, 32).half()
    cos_sin = (torch.ones(1, 5, 16), torch.zeros(1, 5, 16))
    assert attention(hidden, cos_sin, None, past_key_values=object())[0] == "unsloth"  # a KV cache
    assert attention(hidden.float(), cos_sin, None)[0] == "unsloth"  # not Unsloth's fp16 input
    assert attention(hidden, cos_sin, torch.ones(1, 5))[0] == "unsloth"  # a padding mask: Unsloth's builder
    assert len(seen) == 3
    out, weights = attention(hidden, cos_sin, None)
    assert weights is None and out.shape == hidden.shape and out.dtype == torch.float16 and len(seen) == 3


def test_patch_only_in_unsloths_float32_mode(monkeypatch):
    monkeypatch.delenv("UNSLOTH_FORCE_FLOAT32", raising=False)
    model = _tiny_model()
    assert patch_gemma3_attention(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_backend_leaves_unsloths_attention_without_its_helpers(monkeypatch):
    """The Unsloth backend passes unsloth_zoo's SDPA dispatch and mask builder; where they cannot be imported (a
    newer unsloth_zoo moved them; here: no unsloth_zoo at all) it patches nothing rather than guess the kernels."""
    import importlib.util

    from trinity_core.train.backends.unsloth import patch_lean_attention

    if importlib.util.find_spec("unsloth_zoo") is not None:
        pytest.skip("unsloth_zoo is installed: the GPU test covers the patched path")
    monkeypatch.setenv("UNSLOTH_FORCE_FLOAT32", "1")
    model = _tiny_model(1)
    assert patch_lean_attention(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
