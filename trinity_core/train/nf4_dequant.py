"""A frozen NF4 weight dequantised by one Triton kernel that compiled graphs launch from their own code.

Inside the compiled decoder layers (``train/compiled_layers``) a frozen 4-bit projection is ``x Wᵀ`` with W
dequantised here. bitsandbytes' ``gemm_4bit`` is an opaque op there, launched through its Python dispatch
(~190 µs of host time a call at the 12B shape, on a step that is host-bound); the same arithmetic written in
torch operations for inductor to fuse cost ~0.28 s more a micro-step at 48 layers than the regions with
bitsandbytes' op (0.586× against 0.779× compiled LoRA in one H200 run, docs/BENCHMARKS.md, "Goal 1, 2026-11-29
(night)"; presumably its per-element gathers and divisions, not profiled). So
``trinity::nf4_dequantize`` is a ``torch.library.triton_op``: inductor sees its kernel and launches it from
its generated code like its own.

The kernel reads a run of packed bytes a program: each byte's high nibble is the first value, its low nibble
the second (bitsandbytes' order), ``table[code] · absmax`` in fp32 per ``blocksize`` values of the flat stream,
a double-quantised absmax as ``code2[q] · absmax2`` rounded, then ``+ offset`` (as bitsandbytes computes it,
never one fused multiply-add), and one conversion to the output dtype: bitsandbytes' values to the bit
(``tests/core/test_nf4_dequant.py`` in Triton's interpreter, ``tests/gpu/test_nf4_matmul_cuda.py`` compiled).
Without CUDA (or Triton) the op computes the same arithmetic in torch operations.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from trinity_core.train.fast_dora.nf4_matmul import interpreting

try:  # module globals: Triton's interpreter finds ``tl`` in the kernel function's globals
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BLOCK_BYTES = 1024
"""Packed bytes a program (2048 values)."""


def covers(base: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``base`` is a frozen bitsandbytes NF4 layer computing exactly ``x Wᵀ`` for x of ``dtype`` with W
    dequantised in ``dtype``: no bias, compute and quantisation dtype x's, not repacked for CPU inference,
    scales plain or double-quantised once."""
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    return (state is not None and state.quant_type == "nf4" and state.dtype == dtype
            and getattr(base, "bias", None) is None and not weight.requires_grad
            and getattr(base, "compute_dtype", None) in (None, dtype)
            and not getattr(state, "packing_format_for_cpu", False)
            and not (state.nested and state.state2.nested))


def dequantize(weight: Any, dtype: torch.dtype, tail: torch.Tensor | None = None) -> torch.Tensor:
    """The whole (out, in) weight of a ``Params4bit`` in ``dtype``, through ``trinity::nf4_dequantize``; with
    ``tail`` (out, k) in ``dtype``, ``[W | tail]`` (out, in + k), W written straight into its columns (no copy of W:
    :mod:`~trinity_core.train.fast_dora.lora_in_gemm`)."""
    state = weight.quant_state
    stream = weight.view(torch.uint8).reshape(-1)
    rows, cols = state.shape
    if state.nested:
        inner = state.state2
        return torch.ops.trinity.nf4_dequantize(stream, state.code, state.absmax, inner.absmax, inner.code,
                                                state.offset.reshape(1), state.blocksize, inner.blocksize, rows,
                                                cols, dtype, tail)
    return torch.ops.trinity.nf4_dequantize(stream, state.code, state.absmax, None, None, None, state.blocksize, 0,
                                            rows, cols, dtype, tail)


@torch.library.triton_op("trinity::nf4_dequantize", mutates_args=())
def _nf4_dequantize(stream: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                    code2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, blocksize2: int,
                    rows: int, cols: int, dtype: torch.dtype, tail: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, cols) in ``dtype`` from the flat packed ``stream`` (uint8, 2 values a byte), the 16-value ``code``
    table and one ``absmax`` per ``blocksize`` values: fp32, or uint8 indices into ``code2`` scaled by
    ``absmax2`` (one per ``blocksize2`` of them) plus ``offset`` (1,) where double-quantised. With ``tail``
    (rows, k): (rows, cols + k), the tail copied into the last k columns."""
    extra = 0 if tail is None else tail.shape[1]
    out = torch.empty((rows, cols + extra), dtype=dtype, device=stream.device)
    if triton is not None and (stream.is_cuda or interpreting()):
        nested = absmax2 is not None
        kernel, tail_kernel = _kernel(interpreting())
        wrap = (lambda k: k) if interpreting() else torch.library.wrap_triton
        wrap(kernel)[(triton.cdiv(stream.numel(), BLOCK_BYTES),)](
            stream, code, absmax, absmax2 if nested else absmax, code2 if nested else code,
            offset if nested else code, out, rows * cols, stream.numel(), BLOCKSIZE=blocksize,
            BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, BLOCK=BLOCK_BYTES, PTX=not interpreting(),
            COLS=cols if extra else 0, ROW_STRIDE=cols + extra if extra else 0)
        # the tail by a kernel, not ``out[:, cols:].copy_(tail)``: functionalised, that slice's copy rewrote the
        # whole of out (36 µs for gate_proj at the 12B shape, call 34)
        if extra:
            tail = tail.contiguous()
            wrap(tail_kernel)[(triton.cdiv(rows * extra, TAIL_BLOCK),)](tail, out, rows * extra, cols,
                                                                        K=extra, ROW_STRIDE=cols + extra,
                                                                        BLOCK=TAIL_BLOCK)
        return out
    if extra:
        out[:, cols:].copy_(tail)
    numel = rows * cols
    codes = torch.stack((stream >> 4, stream & 15), dim=-1).reshape(-1)[:numel].long()
    scale = absmax.float()
    if absmax2 is not None:
        inner = torch.arange(absmax.numel(), device=stream.device) // blocksize2
        scale = code2.float()[absmax.long()] * absmax2.float()[inner] + offset.float()
    index = torch.arange(numel, device=stream.device) // blocksize
    out[:, :cols].copy_((code.float()[codes] * scale[index]).view(rows, cols))
    return out


TAIL_BLOCK = 1024
"""Tail values a program (:func:`_tail_kernel`)."""


@functools.cache
def _kernel(interpret: bool):
    """The kernels (dequantisation, tail), compiled or interpreted on CPU tensors: ``interpret`` is part of the
    cache key because ``triton.jit`` picks the interpreter when it wraps the function."""
    return triton.jit(_dequantize_kernel), triton.jit(_tail_kernel)


def _tail_kernel(tail_ptr, out_ptr, n, cols, K: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Program p: values [p·BLOCK, (p+1)·BLOCK) of the contiguous (rows, K) tail into columns cols… of ``out``."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = at < n
    tl.store(out_ptr + (at // K) * ROW_STRIDE + cols + at % K, tl.load(tail_ptr + at, mask=ok), mask=ok)


def _dequantize_kernel(stream_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel, n_bytes,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCK: tl.constexpr, PTX: tl.constexpr, COLS: tl.constexpr, ROW_STRIDE: tl.constexpr):
    """Program p: bytes [p·BLOCK, (p+1)·BLOCK) of the stream into values [2p·BLOCK, 2(p+1)·BLOCK) of ``out``
    (COLS > 0: value v into row v // COLS, column v % COLS of rows ROW_STRIDE apart; constants of the launch, so
    the division is a multiplication). Both values of a byte lie in one quantisation block (blocksizes are
    even)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK
    at = first + tl.arange(0, BLOCK)
    ok = at < n_bytes
    byte = tl.load(stream_ptr + at, mask=ok, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 15))
    block = (at * 2) // BLOCKSIZE
    if NESTED:  # the nested scale as nf4_matmul's kernel computes it (a shared @triton.jit helper would be bound
        # to compiled or interpreted mode when Triton is imported, and the CPU tests run these kernels interpreted)
        q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        code2, absmax2 = tl.load(code2_ptr + q), tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
        if PTX:  # mul.rn is never fused into an FMA with the add (the interpreter's numpy never fuses)
            scale = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [code2, absmax2],
                                              dtype=tl.float32, is_pure=True, pack=1)
        else:
            scale = code2 * absmax2
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    values = tl.reshape(tl.join(high * scale, low * scale), (2 * BLOCK,))  # tl.interleave (a jit function: not in
    # the interpreter when TRITON_INTERPRET is set after Triton's import)
    where = 2 * first + tl.arange(0, 2 * BLOCK)
    dest = (where // COLS) * ROW_STRIDE + where % COLS if COLS > 0 else where
    tl.store(out_ptr + dest, values.to(out_ptr.dtype.element_ty), mask=where < numel)


__all__ = ["BLOCK_BYTES", "covers", "dequantize"]
