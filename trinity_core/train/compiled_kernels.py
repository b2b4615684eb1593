"""Gemma-3's elementwise kernels, compiled, for the bf16 path that runs with Unsloth's compile mode off.

With DoRA the Unsloth backend turns Unsloth's torch.compile mode off: its decoder-layer compile fails on
fast DoRA's layers ("Could not guard on data-dependent expression", docs/BENCHMARKS.md). That also leaves
eager the two standalone kernels that mode compiles on their own, whatever the adapters:

- Gemma-3's RMSNorm (four a decoder layer, plus the final one): ``x → fp32 → x·rsqrt(mean(x²)+eps) ·
  (1+w) → x's dtype``, eagerly five to seven launches over (tokens × hidden) tensors, most of them fp32,
  and their backward;
- the attention's *prepare*: q, k, v to heads, q_norm and k_norm (the same RMSNorm over head_dim), RoPE
  on q and k, and the contiguous copies the attention kernel takes: some twenty launches.

This module compiles the same arithmetic with ``torch.compile`` (dynamic shapes: one graph for every sequence
length) into a few fused kernels forward and backward, and leaves every LoRA/DoRA projection, the MLP and the
attention kernel as they are. 12B shape, 48 layers, seq 4096, fast DoRA, one H200 run: kernel time 3.99 → 3.04 s
an optimizer step, 3490 → 3698 tok/s, peak 11.09 → 10.80 GiB (docs/BENCHMARKS.md, "Goal 1").

:func:`rms_norm` and :func:`qkv_heads` are the reference arithmetic (eager, used by the tests);
:func:`compiled` returns them compiled, once per process and backend. :func:`install_compiled_norms` installs
the compiled norm per ``Gemma3RMSNorm`` module; the attention's prepare lives inside Unsloth's attention
forward, so the Unsloth backend swaps it (``backends/unsloth.py``).

The values are those of the eager arithmetic up to the fused kernels' rounding (inductor keeps the fp32
intermediates in registers and may reorder the reduction), as with Unsloth's compile mode.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from trinity_core.train.lean_norm import install_forward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma-3's RMSNorm over the last dimension, computed in fp32 and returned in x's dtype (as
    transformers' ``Gemma3RMSNorm`` and Unsloth's bf16-path norm compute it)."""
    x32 = x.to(torch.float32)
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.to(torch.float32))).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_weight: torch.Tensor, k_weight: torch.Tensor, q_eps: float, k_eps: float,
              heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projections' outputs (bsz, seq, heads·head_dim) to contiguous (bsz, heads, seq, head_dim):
    q and k through their RMSNorm and RoPE (``cos``, ``sin``: (bsz, seq, head_dim)), v as it is; what
    transformers' and Unsloth's Gemma-3 attention compute before the attention kernel."""
    bsz, seq = q.shape[0], q.shape[1]
    q = q.view(bsz, seq, heads, -1).transpose(1, 2)
    k = k.view(bsz, seq, kv_heads, -1).transpose(1, 2)
    v = v.view(bsz, seq, kv_heads, -1).transpose(1, 2)
    q, k = rms_norm(q, q_weight, q_eps), rms_norm(k, k_weight, k_eps)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q.contiguous(), k.contiguous(), v.contiguous()


@functools.cache
def compiled(backend: str = "inductor") -> types.SimpleNamespace:
    """:func:`rms_norm` and :func:`qkv_heads` through ``torch.compile`` (dynamic shapes); compiled at their
    first call. Each traces as one graph (the tests check it); not ``fullgraph``, so that a call past Dynamo's
    recompile limit (a new dtype or grad mode beyond 8 variants) runs eagerly rather than failing the job.
    ``backend``: "inductor" on a GPU; the tests use "aot_eager" (the same tracing and autograd split, without
    generating kernels)."""
    options = dict(dynamic=True, backend=backend)
    return types.SimpleNamespace(rms_norm=floats_as_constants(torch.compile(rms_norm, **options)),
                                 qkv_heads=floats_as_constants(torch.compile(qkv_heads, **options)))


def floats_as_constants(compiled_fn: Any) -> Any:
    """``compiled_fn`` (a ``torch.compile``'d function with dynamic shapes) called with Dynamo tracing the Python
    floats it reads as constants (``specialize_float``), not as inputs: with ``dynamic=True`` Dynamo passes each
    float (a norm's eps, a LoRA scaling, the attention's scale) as a 0-dim float64 tensor on the CPU, and
    inductor generates C++ CPU kernels to convert them for the GPU's, compiled by the host's C++ compiler. On
    an H200 the tiny job's first step with compiled layers did not finish in 130-200 s that way (calls 9-12,
    docs/BENCHMARKS.md). The floats are the same in every layer; a new value recompiles. The switch is Dynamo's
    global setting, set only around the call (~4 µs) and restored after."""

    @functools.wraps(compiled_fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        config = torch._dynamo.config
        prior = config.specialize_float
        config.specialize_float = True
        try:
            return compiled_fn(*args, **kwargs)
        finally:
            config.specialize_float = prior

    return call


PLAIN = types.SimpleNamespace(rms_norm=rms_norm, qkv_heads=qkv_heads)
"""The reference functions, in :func:`compiled`'s shape (built once: Dynamo cannot trace building it)."""


def kernels(backend: str = "inductor") -> types.SimpleNamespace:
    """:func:`compiled` outside a compiled region; inside one (``train/compiled_layers``) the plain functions,
    which the region's trace inlines (a call to the cached compiled ones there would break the graph)."""
    if torch.compiler.is_compiling():
        return PLAIN
    return compiled(backend)


def compiled_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Gemma3RMSNorm.forward`` through the compiled norm (x flattened to 2-D, so one graph serves the
    hidden-size norms whatever the batch shape)."""
    out = kernels(self._trinity_compile_backend).rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
    return out.view(x.shape)


def install_compiled_norms(model: nn.Module, backend: str = "inductor") -> int:
    """Give every ``Gemma3RMSNorm`` of ``model`` that has no forward of its own yet the compiled norm.
    Returns how many. The caller decides where it applies (the bf16 path with Unsloth's compile off)."""
    return install_forward(model, "Gemma3RMSNorm", compiled_norm_forward, _trinity_compile_backend=backend)


def find_closure_cell(function: Any, name: str, depth: int = 4) -> Any:
    """The closure cell called ``name`` in ``function`` or in the functions its closure (or
    ``__wrapped__``) holds, at most ``depth`` levels down; None if there is none."""
    seen: set[int] = set()
    todo = [(function, 0)]
    while todo:
        fn, level = todo.pop()
        if id(fn) in seen or level > depth:
            continue
        seen.add(id(fn))
        code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
        if code is not None:
            for var, cell in zip(code.co_freevars, cells):
                if var == name:
                    return cell
                try:
                    inner = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if callable(inner):
                    todo.append((inner, level + 1))
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            todo.append((wrapped, level + 1))
    return None


__all__ = ["compiled", "find_closure_cell", "floats_as_constants", "install_compiled_norms", "kernels", "qkv_heads",
           "rms_norm", "rotate_half"]
