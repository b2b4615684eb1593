"""Gemma-3 attention under Unsloth's float32 mode, its core recomputed in backward.

On a GPU without bf16 (the T4) Unsloth replaces ``Gemma3Attention.forward`` (``UNSLOTH_FORCE_FLOAT32=1``,
unsloth_zoo's ``patch_Gemma3Attention``): the q, k and v projections in fp16, then the *core*

    q, k → fp32 → RMSNorm (q_norm, k_norm) → clamp to ±65504 → fp16 → fp32 → RoPE (fp32);
    v → fp32; SDPA in fp32 (k and v repeated to the query heads where the efficient kernel takes no
    GQA); the output → fp16 for o_proj,

through autograd, which keeps every fp32 intermediate of the core for backward: at the 12B shape and
seq 4096 about 0.44 GiB a decoder layer (the H200 trace in docs/BENCHMARKS.md, "T4 headroom"), alive
from the layer's checkpointed recompute through its MLP backward, where the T4 path peaks.

:class:`RecomputedCore` runs the core without grad and saves only its inputs (the fp16 projection
outputs: 64 MiB at that shape, and the shared cos/sin, norm weights and mask); its backward runs the
core again with grad and back-propagates through it, a group of heads at a time. The same operations in
the same order: the same values forward (bit for bit; on CPU the gradients too), and on CUDA gradients
within the run-to-run noise of Unsloth's own step (``tests/gpu/test_lean_attention_cuda.py``). The price
is one more forward of the core (SDPA in fp32) a layer per micro-batch: 0.86× the step's speed on the
H200 T4 emulation, for 0.38 GiB less at its peak (docs/BENCHMARKS.md, "T4 headroom, 2026-11-29 (later)").

:func:`patch_gemma3_attention` installs it per module, only in Unsloth's float32 mode, and only for
training without a KV cache, dropout or flex attention; everything else runs Unsloth's forward. Unsloth's
SDPA dispatch and mask builder are passed in by the Unsloth backend (the only module that imports
Unsloth); the defaults here are plain-torch equivalents, for the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from trinity_core.train.lean_norm import FP16_MAX, patch_in_float32_mode

Sdpa = Callable[..., torch.Tensor]
"""``sdpa(q, k, v, mask, dropout_p, is_causal, scale, groups)``, as unsloth_zoo's ``gqa_sdpa``."""
MaskBuilder = Callable[..., "torch.Tensor | None"]
"""``mask(attention_mask, q, k, sliding_window)``, as unsloth_zoo's ``_prepare_gemma3_sdpa_attention_mask``."""


def gqa_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, groups):
    """Plain SDPA with grouped-query heads (what unsloth_zoo's ``gqa_sdpa`` computes, without its kernel choice)."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=groups != 1)


def sdpa_mask(attention_mask, query, key, sliding_window=None):
    """The mask SDPA gets (None: causal), as Unsloth builds it for an unpadded batch: a prepared 4-D mask
    as it is; without one, none without a sliding window or within it, else causal ∧ within the window.
    A 2-D padding mask is not handled here (with this builder the lean forward leaves it to Unsloth)."""
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            raise ValueError("sdpa_mask: a 2-D padding mask needs Unsloth's builder")
        return attention_mask
    q_len, kv_len = query.shape[2], key.shape[2]
    if sliding_window is None or not (kv_len > sliding_window or 1 < q_len < kv_len):
        return None
    q_pos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    return ((k_pos <= q_pos) & (k_pos > q_pos - sliding_window))[None, None]


@dataclass(frozen=True)
class CoreShape:
    """What the core needs of its attention module besides tensors."""

    heads: int
    kv_heads: int
    head_dim: int
    q_eps: float
    k_eps: float
    scale: float | None
    causal: bool
    sdpa: Sdpa


def _rms_fp16(x32: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Unsloth's inline ``_gemma3_rms_norm`` in fp32, clamped and rounded through fp16, back in fp32."""
    variance = x32.pow(2).mean(-1, keepdim=True)
    out = x32 * torch.rsqrt(variance + eps) * (1.0 + weight.to(torch.float32))
    return torch.clamp(out, min=-FP16_MAX, max=FP16_MAX).to(torch.float16).to(torch.float32)


def attention_core(q16, k16, v16, cos, sin, q_weight, k_weight, mask, shape: CoreShape) -> torch.Tensor:
    """The projections' outputs (batch, seq, heads·dim) fp16 → o_proj's input (batch, seq, heads·dim) fp16,
    as unsloth_zoo 2026.10.9's float32-mode ``prepare`` and ``forward_function`` compute it."""
    bsz, q_len = q16.shape[:2]
    q = q16.view(bsz, q_len, shape.heads, shape.head_dim).to(torch.float32).transpose(1, 2)
    k = k16.view(bsz, q_len, shape.kv_heads, shape.head_dim).to(torch.float32).transpose(1, 2)
    v = v16.view(bsz, q_len, shape.kv_heads, shape.head_dim).to(torch.float32).transpose(1, 2)
    q, k = _rms_fp16(q, q_weight, shape.q_eps), _rms_fp16(k, k_weight, shape.k_eps)
    q, k = apply_rotary_pos_emb(q, k, cos=cos.to(torch.float32), sin=sin.to(torch.float32))
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        mask = mask.to(torch.float32)
    out = shape.sdpa(q.contiguous(), k.contiguous(), v.contiguous(), mask, 0.0,
                     q_len > 1 and mask is None and shape.causal, shape.scale, shape.heads // shape.kv_heads)
    return out.transpose(1, 2).contiguous().reshape(bsz, q_len, -1).to(torch.float16)


HEAD_GROUPS = 4
"""Backward recomputes the core for this many groups of key/value heads in turn, each with its query
heads. Every operation of the core is per head (the norms over a head's dimension, RoPE, SDPA), so the
values are the same as in one pass, and the recompute's fp32 intermediates and SDPA's gradients
(~0.78 GiB a layer at the 12B shape and seq 4096, where the T4 path's attention backward peaked in one
pass: docs/BENCHMARKS.md, "T4 headroom") are alive for one group at a time."""


class RecomputedCore(torch.autograd.Function):
    """:func:`attention_core` that saves its inputs only and runs again, with grad, in backward: a
    :data:`HEAD_GROUPS` th of the heads at a time. The q/k norm weights' gradients (frozen under LoRA)
    are summed over the groups, so they differ from one pass in rounding."""

    @staticmethod
    def forward(ctx, q16, k16, v16, cos, sin, q_weight, k_weight, mask, shape):
        ctx.save_for_backward(q16, k16, v16, cos, sin, q_weight, k_weight, mask)
        ctx.shape = shape
        return attention_core(q16, k16, v16, cos, sin, q_weight, k_weight, mask, shape)

    @staticmethod
    def backward(ctx, dout):
        q16, k16, v16, cos, sin, q_weight, k_weight, mask = ctx.saved_tensors
        shape, need = ctx.shape, ctx.needs_input_grad
        wanted = (need[0], need[1], need[2], need[5], need[6])  # q16, k16, v16, q_weight, k_weight
        grads = [torch.empty_like(t) if n else None for t, n in zip((q16, k16, v16), wanted)]
        grads += [torch.zeros_like(w) if n else None for w, n in zip((q_weight, k_weight), wanted[3:])]
        todo = [i for i, n in enumerate(wanted) if n]
        group, dim = shape.heads // shape.kv_heads, shape.head_dim
        for first, stop in _head_groups(shape.kv_heads) if todo else []:
            q_cols, kv_cols = slice(first * group * dim, stop * group * dim), slice(first * dim, stop * dim)
            leaves = [q16.detach()[..., q_cols], k16.detach()[..., kv_cols], v16.detach()[..., kv_cols],
                      q_weight.detach(), k_weight.detach()]
            for leaf, n in zip(leaves, wanted):
                leaf.requires_grad_(n)
            part = replace(shape, heads=(stop - first) * group, kv_heads=stop - first)
            with torch.enable_grad():
                out = attention_core(*leaves[:3], cos, sin, *leaves[3:], _mask_heads(mask, first * group,
                                                                                     stop * group), part)
            for i, grad in zip(todo, torch.autograd.grad(out, [leaves[i] for i in todo], dout[..., q_cols])):
                if i < 3:
                    grads[i][..., q_cols if i == 0 else kv_cols] = grad
                else:
                    grads[i] += grad
        dq, dk, dv, dqw, dkw = grads
        return dq, dk, dv, None, None, dqw, dkw, None, None


def _head_groups(kv_heads: int) -> list[tuple[int, int]]:
    """``[(first, stop)]`` key/value heads of each of at most :data:`HEAD_GROUPS` groups."""
    size = -(-kv_heads // max(1, min(HEAD_GROUPS, kv_heads)))
    return [(first, min(first + size, kv_heads)) for first in range(0, kv_heads, size)]


def _mask_heads(mask, first: int, stop: int):
    """The mask for query heads [first, stop): a mask with one entry for all heads (the usual one) as it is."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] > 1:
        return mask[:, first:stop]
    return mask


def lean_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                 *args, **kwargs):
    """``Gemma3Attention.forward`` as Unsloth's float32 mode computes it, the core through
    :class:`RecomputedCore`; Unsloth's own forward wherever :func:`_lean_applies` says no."""
    if args or not _lean_applies(self, hidden_states, position_embeddings, attention_mask, kwargs):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    q16, k16, v16 = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    shape = CoreShape(getattr(self, "num_heads", self.config.num_attention_heads),
                      getattr(self, "num_key_value_heads", self.config.num_key_value_heads), self.head_dim,
                      self.q_norm.eps, self.k_norm.eps, getattr(self, "scaling", None),
                      bool(getattr(self, "is_causal", True)), self._lean_sdpa)
    bsz, q_len = hidden_states.shape[:2]
    probe_q = q16.new_empty((bsz, shape.heads, q_len, 0))  # the mask builder reads shapes and the device only
    probe_k = q16.new_empty((bsz, shape.kv_heads, q_len, 0))
    mask = self._lean_mask(attention_mask, probe_q, probe_k, getattr(self, "sliding_window", None))
    cos, sin = position_embeddings
    core = RecomputedCore.apply if torch.is_grad_enabled() else attention_core
    return self.o_proj(core(q16, k16, v16, cos, sin, self.q_norm.weight, self.k_norm.weight, mask, shape)), None


def _lean_applies(module: nn.Module, hidden_states, position_embeddings, attention_mask, kwargs: dict) -> bool:
    """Training-shaped calls only: no KV cache, no dropout, an (cos, sin) pair, no mask the mask
    builder cannot take, SDPA (not flex attention), an fp16 input and 4-bit or fp16 projections (so
    the input reaches them unchanged and o_proj's input is fp16, as Unsloth's boundary helpers decide)."""
    if hidden_states.dtype != torch.float16:
        return False
    if kwargs.get("past_key_values", kwargs.get("past_key_value")) is not None or kwargs.get("output_attentions"):
        return False
    if module.training and getattr(module, "attention_dropout", 0.0):
        return False
    if not (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2):
        return False
    if getattr(module.config, "_attn_implementation", "sdpa") == "flex_attention":
        return False
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):  # a flex BlockMask, say
        return False
    if attention_mask is not None and attention_mask.dim() == 2 and module._lean_mask is sdpa_mask:
        return False
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weight = getattr(getattr(module, name), "weight", None)
        if weight is None or (getattr(weight, "quant_state", None) is None and weight.dtype != torch.float16):
            return False
    return True


def patch_gemma3_attention(model: nn.Module, sdpa: Sdpa = gqa_sdpa, mask: MaskBuilder = sdpa_mask) -> int:
    """Give every ``Gemma3Attention`` of ``model`` the lean forward, in Unsloth's float32 mode only.
    Returns how many (0 outside that mode)."""
    return patch_in_float32_mode(model, "Gemma3Attention", lean_forward, _lean_sdpa=sdpa, _lean_mask=mask)


__all__ = ["CoreShape", "RecomputedCore", "attention_core", "gqa_sdpa", "patch_gemma3_attention", "sdpa_mask"]
