"""Gemma-3's RMSNorm under Unsloth's float32 mode, with a backward that keeps only its input.

On a GPU without bf16 (the T4) Unsloth runs Gemma-3 with ``UNSLOTH_FORCE_FLOAT32=1``: hidden states
between layers in fp32, and every ``Gemma3RMSNorm`` computed as

    out = fp16(clamp(x32 · rsqrt(mean(x32²) + eps) · (1 + w32), fp16 range))

through autograd, which keeps for backward the fp32 copy of an fp16 input and the fp32 product before
the clamp: one or two (tokens × hidden) fp32 tensors a norm, four norms a decoder layer, all alive when
the layer's checkpointed backward starts (0.29 GiB at the 12B shape and seq 4096, H200 trace in
docs/BENCHMARKS.md, "T4 headroom"). :class:`Float32RMSNorm` computes the same forward (the same
operations in the same order, so the same values) and saves x as it came plus one fp32 scale per row;
its backward recomputes the normalised rows a block of rows at a time (:data:`CHUNK_ELEMENTS`): at the
start of a layer's backward, where the layer's saved activations are all alive, it adds its gradient
and ~50 MiB rather than three (tokens × hidden) fp32 buffers.

:func:`patch_gemma3_norms` installs it per module, only where Unsloth's float32 mode is on (Unsloth
decides that at import, from the GPU); elsewhere the norms are left as they are.
"""

from __future__ import annotations

import os
import types

import torch
from torch import nn

FP16_MAX = float(torch.finfo(torch.float16).max)
CHUNK_ELEMENTS = 1 << 22
"""Backward works on blocks of rows of at most this many elements (16 MiB in fp32)."""


class Float32RMSNorm(torch.autograd.Function):
    """``fp16(clamp(x32 · rsqrt(mean(x32²) + eps) · (1 + w32), ±65504))`` over the last dimension,
    saving x (any float dtype) and rstd = rsqrt(mean(x32²) + eps) (rows × 1, fp32).

    Backward, with h = x32·rstd and g = dout where the clamp passed its input (zero elsewhere, as
    ``torch.clamp``'s gradient): ``gh = g·(1+w)``, ``dx = rstd·(gh − h·mean(gh·h))``, ``dw = Σ_rows g·h``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out32 = x32 * rstd * (1.0 + weight.to(torch.float32))
        ctx.save_for_backward(x, weight, rstd)
        return torch.clamp(out32, min=-FP16_MAX, max=FP16_MAX).to(torch.float16)

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        n = x.shape[-1]
        x2, dout2, rstd2 = x.reshape(-1, n), dout.reshape(-1, n), rstd.reshape(-1, 1)
        w1 = 1.0 + weight.to(torch.float32)
        dx = torch.empty_like(x2)
        dw = torch.zeros(n, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        rows = max(1, CHUNK_ELEMENTS // n)
        for start in range(0, x2.shape[0], rows):  # three (rows × n) fp32 buffers at a time
            block = slice(start, start + rows)
            h = x2[block].to(torch.float32, copy=True).mul_(rstd2[block])
            g = dout2[block].to(torch.float32, copy=True)
            t = torch.mul(h, w1)  # the clamp's input again: its gradient is 0 where it clamped
            g.masked_fill_(t.abs_() > FP16_MAX, 0.0)
            if dw is not None:
                dw += (g * h).sum(0)
            gh = torch.mul(g, w1, out=t)
            del g
            mean = (gh.unsqueeze(-2) @ h.unsqueeze(-1)).squeeze(-1).div_(n)  # Σ gh·h a row, no temporary
            dx[block] = gh.sub_(h.mul_(mean)).mul_(rstd2[block])
        return dx.view(x.shape), (dw.to(weight.dtype) if dw is not None else None), None


def float32_mode() -> bool:
    """Whether Unsloth runs Gemma-3 in its float32 mode (it sets ``UNSLOTH_FORCE_FLOAT32=1`` at import
    on a GPU without bf16, and patches ``Gemma3RMSNorm`` then)."""
    return os.environ.get("UNSLOTH_FORCE_FLOAT32", "0") == "1"


def lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Gemma3RMSNorm.forward`` as Unsloth's float32 mode computes it, through :class:`Float32RMSNorm`."""
    return Float32RMSNorm.apply(x, self.weight, self.eps)


def patch_gemma3_norms(model: nn.Module) -> int:
    """Give every ``Gemma3RMSNorm`` of ``model`` the lean forward, in Unsloth's float32 mode only.
    Returns how many (0 outside that mode)."""
    return patch_in_float32_mode(model, "Gemma3RMSNorm", lean_forward)


def patch_in_float32_mode(model: nn.Module, class_name: str, forward, **attributes) -> int:
    """In Unsloth's float32 mode only: give every module of ``model`` whose class is named ``class_name`` and
    that has no forward of its own yet ``forward`` (per instance) and ``attributes``. Returns how many."""
    return install_forward(model, class_name, forward, **attributes) if float32_mode() else 0


def install_forward(model: nn.Module, class_name: str, forward, **attributes) -> int:
    """Give every module of ``model`` whose class is named ``class_name`` and that has no forward of its own yet
    ``forward`` (per instance) and ``attributes``. Returns how many."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ == class_name and "forward" not in module.__dict__:
            for name, value in attributes.items():
                setattr(module, name, value)
            module.forward = types.MethodType(forward, module)
            patched += 1
    return patched


__all__ = ["Float32RMSNorm", "float32_mode", "install_forward", "patch_gemma3_norms", "patch_in_float32_mode"]
