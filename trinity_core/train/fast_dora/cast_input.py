"""Fast DoRA's adapter input where it must be cast: Unsloth's T4 path (fp16 inputs, fp32 adapters).

On a GPU without bf16 Unsloth runs Gemma-3 in its float32 mode: the residual stream in fp32, the
projections fed fp16, the adapters fp32 and no autocast. PEFT then computes ``lora_A(x.to(fp32))``,
and autograd keeps that fp32 copy of every adapted projection's input for A's gradient (the probe and
allocator traces in docs/BENCHMARKS.md, "T4 headroom, 2026-11-29"). Here:

- :class:`FrozenBaseAndA` computes the frozen base and A(x) as one node, saves x as it came, and writes
  x's gradient once, a block of W's columns at a time;
- :class:`CastLinear` is A(x) alone, saving x as it came, where the base is not a plain frozen linear.

Both give the forward values of the base and ``lora_A(x.to(fp32))`` bit for bit, and x's gradient per
element with the same arithmetic (``tests/core/test_qdora.py``). Under autocast, or where x already has
A's dtype, nothing here runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trinity_core import nf4

CHUNK_ELEMENTS = 1 << 24
"""Casts (forward and backward) and products in backward are made a block of at most ~16M elements (64 MB in
fp32) at a time (:func:`_column_blocks` takes a quarter of that)."""


def adapter_input(module: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``A(x)`` as PEFT computes it (outside autocast x is first cast to A's dtype), without keeping
    that cast copy for backward: where a cast happens, :class:`CastLinear` saves x as it came."""
    lora_A = module.lora_A[name]
    if _casts(module, name, x):
        return CastLinear.apply(x, lora_A.weight)
    return lora_A(x if torch.is_autocast_enabled(x.device.type) else module._cast_input_dtype(x, lora_A.weight.dtype))


def _casts(module: torch.nn.Module, name: str, x: torch.Tensor) -> bool:
    """Whether PEFT would cast x for the adapter here (outside autocast, x's dtype not A's, casting on) and
    A is a bias-free linear that :class:`CastLinear` can stand in for."""
    lora_A = module.lora_A[name]
    return (not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_A.weight.dtype
            and lora_A.bias is None and getattr(module, "cast_input_dtype_enabled", True))


class CastLinear(torch.autograd.Function):
    """``x.to(W.dtype) @ Wᵀ`` that saves ``x`` as it came, not its cast (where q, k and v, or gate and up,
    share an input, it is saved once). Backward casts again, :data:`CHUNK_ELEMENTS` at a time (down_proj's
    input at the 12B shape is 240 MiB in fp32), and computes x's gradient in W's dtype a block of rows at
    a time, stored in x's. The same forward values; A's gradient sums its blocks of rows in turn (one
    GEMM, so the same values, where x has at most that many elements)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return cast_linear(x, weight)

    @staticmethod
    def backward(ctx, dxa):
        x, weight = ctx.saved_tensors
        dxa2, x2 = dxa.reshape(-1, dxa.shape[-1]), x.reshape(-1, x.shape[-1])
        rows = max(1, CHUNK_ELEMENTS // x2.shape[1])
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dxa·A in A's dtype, a block of rows at a time, stored in x's
            dx = torch.empty_like(x2)
            for start in range(0, x2.shape[0], rows):
                dx[start:start + rows] = dxa2[start:start + rows].mm(weight)
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(dxa2, x2, weight.dtype)
        return dx, dw


def base_and_adapter_input(module: torch.nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W x, A(x))`` of a plain fast-DoRA layer: one :class:`FrozenBaseAndA` node where x is cast for
    the adapter (outside autocast, another dtype than A's) and the base is a frozen bias-free linear
    computing in x's dtype; else the base layer's own forward and :func:`adapter_input`. Where x was
    marked :func:`consumable`, that node's backward writes x's gradient over x."""
    base = module.get_base_layer()
    if _casts(module, name, x) and _frozen_linear(base, x.dtype):
        return FrozenBaseAndA.apply(x, module.lora_A[name].weight, base, getattr(x, _CONSUMABLE, False))
    return base(x), adapter_input(module, name, x)


_CONSUMABLE = "_fast_dora_consumable"


def consumable(x: torch.Tensor) -> torch.Tensor:
    """Mark ``x`` as a fresh tensor that only the projection it is passed to reads (the gated MLP's
    activation, down_proj's input): that projection's :class:`FrozenBaseAndA` may write x's gradient
    over x in backward. A mark on the tensor, not an argument, so the projection is still called
    through ``nn.Module.__call__`` (its hooks run); whatever does not see the mark (a hook that replaces x,
    another forward) just keeps x."""
    setattr(x, _CONSUMABLE, True)
    return x


def _frozen_linear(base: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``base`` computes ``x Wᵀ`` in ``dtype`` with W frozen and no bias: an ``nn.Linear`` or a
    bitsandbytes ``Linear4bit`` (not repacked for CPU inference) of that compute dtype."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or getattr(base, "bias", None) is not None:
        return False
    if type(base) is torch.nn.Linear:
        return weight.dtype == dtype
    state = getattr(weight, "quant_state", None)
    return (type(base).__name__ == "Linear4bit" and weight.__class__.__name__ == "Params4bit" and state is not None
            and not getattr(state, "packing_format_for_cpu", False)
            and getattr(base, "compute_dtype", None) in (None, dtype) and state.dtype == dtype)


class FrozenBaseAndA(torch.autograd.Function):
    """``(W x, x.to(A.dtype) Aᵀ)`` for a frozen base W (no bias) and the adapter's A, one node, saving x
    as it came (as :class:`CastLinear` does). With ``consume`` (x marked :func:`consumable`) backward
    takes A's gradient first and then writes x's gradient over x (120 MiB fewer on down_proj of the
    12B shape, where the T4 path peaks); that node's backward runs once (a second one raises).

    Backward writes x's gradient once: ``dx = d_base·W + (d_xa·A → x's dtype)``, a block of W's columns
    at a time (``nf4.column_blocks``: each block's elements equal the whole weight's), so neither the
    whole dequantised W nor the two (tokens × in) gradients that autograd sums (the base's and the
    adapter's) are held at once. Per element it is the same arithmetic as bitsandbytes' backward
    (``d_base @ dequantise(W).to(dtype)``) plus autograd's sum of the adapter's part rounded to x's
    dtype. On down_proj of the 12B shape under Unsloth's T4 path: x's gradient (120 MiB) and ~40 MiB of
    blocks, where the two nodes held both gradients and the whole dequantised W (352 MiB; x, saved for
    A's gradient, is alive during this backward, 120 MiB, which the two nodes had freed by then)."""

    @staticmethod
    def forward(ctx, x, weight, base, consume=False):
        result = base(x)
        xa = cast_linear(x, weight)
        ctx.save_for_backward(x, weight)
        ctx.base, ctx.consume, ctx.consumed = base, consume and x.is_contiguous(), False
        return result, xa

    @staticmethod
    def backward(ctx, d_base, d_xa):
        if ctx.consumed:
            raise RuntimeError("FrozenBaseAndA: backward already ran and overwrote its saved input with its "
                               "gradient; it cannot run twice (retain_graph)")
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dxa2 = d_xa.reshape(-1, d_xa.shape[-1]) if d_xa is not None else None
        dx = dw = None
        if ctx.needs_input_grad[1] and dxa2 is not None:  # first: with consume, dx is written over x
            dw = _weight_grad(dxa2, x2, weight.dtype)
        if ctx.needs_input_grad[0]:
            ctx.consumed = ctx.consume
            dx = x2 if ctx.consume else torch.empty_like(x2)
            d_base2 = d_base.reshape(-1, d_base.shape[-1]) if d_base is not None else None
            for start, stop, w in _column_blocks(ctx.base, x.dtype, x2.shape[0]):
                part = d_base2.mm(w) if d_base2 is not None else torch.zeros_like(dx[:, start:stop])
                if dxa2 is not None:
                    part += dxa2.mm(weight[:, start:stop]).to(part.dtype)
                dx[:, start:stop] = part
            dx = dx.view(x.shape)
        return dx, dw, None, None


def cast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x.to(W.dtype) @ Wᵀ`` with x cast :data:`CHUNK_ELEMENTS` at a time: the whole cast of down_proj's
    input at the 12B shape is 240 MiB in fp32, and under Unsloth's T4 path it was the transient that set the
    peak of the layer's recompute (docs/BENCHMARKS.md, "T4 headroom"). One GEMM where x has at most that
    many elements; otherwise a GEMM a block of rows (the rows' values from the same products, maybe
    summed in another order by the GEMM library)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = max(1, CHUNK_ELEMENTS // x2.shape[1])
    if x2.shape[0] <= rows:
        return torch.nn.functional.linear(x.to(weight.dtype), weight)
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=weight.dtype, device=x.device)
    for start in range(0, x2.shape[0], rows):
        torch.mm(x2[start:start + rows].to(weight.dtype), weight.t(), out=out[start:start + rows])
    return out.view(*x.shape[:-1], weight.shape[0])


def _weight_grad(dxa2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_t dxaᵀ·x`` (A's gradient) with x cast to ``dtype`` a block of :data:`CHUNK_ELEMENTS` at a time."""
    rows = max(1, CHUNK_ELEMENTS // x2.shape[1])
    dw = dxa2[:rows].t().mm(x2[:rows].to(dtype))
    for start in range(rows, x2.shape[0], rows):
        dw.addmm_(dxa2[start:start + rows].t(), x2[start:start + rows].to(dtype))
    return dw


def _column_blocks(base: torch.nn.Module, dtype: torch.dtype, tokens: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(first, stop, W[:, first:stop])`` of a :func:`_frozen_linear` base in ``dtype``, blocks narrow
    enough that neither W's block nor the (tokens × block) fp32 product of the caller exceeds a
    quarter of :data:`CHUNK_ELEMENTS` (16 MiB): down_proj's input gradient at the 12B shape in 15 blocks."""
    weight = base.weight
    out_features = weight.shape[0] if type(base) is torch.nn.Linear else weight.quant_state.shape[0]
    step = max(1, CHUNK_ELEMENTS // (4 * max(out_features, tokens)))
    if type(base) is torch.nn.Linear:
        for start in range(0, weight.shape[1], step):
            yield start, min(start + step, weight.shape[1]), weight[:, start:start + step]
        return
    for start, stop, w in nf4.column_blocks(weight.data, weight.quant_state, step, weight.quant_state.dtype):
        yield start, stop, w.to(dtype)


__all__ = ["CastLinear", "FrozenBaseAndA", "adapter_input", "base_and_adapter_input", "consumable"]
