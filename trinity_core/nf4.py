"""Exact dequantisation of bitsandbytes 4-bit (NF4/FP4) weights, whole or a block of rows at a time.

bitsandbytes quantises a weight as one flat stream of ``blocksize`` elements per absmax, whatever
the row width. Its CPU kernel, asked for a 2-D shape whose width is not a multiple of the
blocksize, reads that stream per row instead: on a CPU with AVX-512 (bitsandbytes 0.50.2) every
row after the first comes out wrong (12×96 NF4 weight: max |Δ| 2.0; width 128 exact). The scalar
CPU path and the CUDA kernel read the stream flat, so the same code gave different numbers on
different machines. Asking for a 1-D shape is read flat by every backend, so everything here
dequantises flat and reshapes afterwards.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch


def absmax_of(state: Any) -> torch.Tensor:
    """The fp32 absmax per block of a ``QuantState``, undoing double quantisation."""
    if state.nested:
        import bitsandbytes.functional as bnbf

        return (bnbf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset).contiguous()
    return state.absmax.float().contiguous()


def dequantize_flat(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Dequantise the packed stream ``packed`` (2 values a byte, row-major) into ``shape``.

    ``absmax`` holds one scale per ``blocksize`` values of that stream, the first for its first value.
    On CPU a 16-bit result is the fp32 one rounded once, as the CUDA kernel rounds (the product in fp32,
    then one conversion), whatever bitsandbytes' CPU kernel for fp16/bf16 does on a given CPU (see
    ``trinity_core.export.merge.Quant.device`` for the merge that differed on the H200 host).
    """
    numel = math.prod(shape)
    wanted = dtype
    if packed.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    out = torch.ops.bitsandbytes.dequantize_4bit.default(
        packed.view(torch.uint8).reshape(-1, 1), absmax, blocksize, quant_type, [numel], dtype)
    return out.reshape(*shape).to(wanted)


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight of a ``Params4bit`` (or its packed data and ``QuantState``)."""
    return dequantize_flat(packed, absmax_of(state), state.blocksize, state.quant_type, state.shape,
                           dtype or state.dtype)


def row_blocks(packed: torch.Tensor, state: Any, rows_per_block: int, dtype: torch.dtype,
               absmax: torch.Tensor | None = None):
    """Yield ``(first_row, rows)``, at most ``rows_per_block`` rows at a time (rounded down to whole
    quantisation blocks), dequantising only those rows' part of the packed stream."""
    out_features, in_features = state.shape
    block = state.blocksize
    aligned = block // math.gcd(in_features, block)  # rows per whole number of quantisation blocks
    if (aligned * in_features) % 2:  # a block boundary inside a byte: cannot slice the stream
        yield 0, dequantize(packed, state, dtype)
        return
    absmax = absmax_of(state) if absmax is None else absmax
    stream = packed.view(torch.uint8).reshape(-1)
    step = max(aligned, rows_per_block // aligned * aligned)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        lo, hi = start * in_features, stop * in_features
        yield start, dequantize_flat(stream[lo // 2:(hi + 1) // 2], absmax[lo // block:-(-hi // block)].contiguous(),
                                     block, state.quant_type, (stop - start, in_features), dtype)


def column_blocks(packed: torch.Tensor, state: Any, columns_per_block: int, dtype: torch.dtype):
    """Yield ``(first_column, stop_column, columns)``: the weight's columns ``[first, stop)`` (all rows),
    at most ``columns_per_block`` at a time (rounded down to whole quantisation blocks), each element
    equal to the whole weight's. Needs rows made of whole blocks (``in_features`` a multiple of the
    blocksize); otherwise yields the whole weight once."""
    out_features, in_features = state.shape
    block = state.blocksize
    if in_features % block:
        yield 0, in_features, dequantize(packed, state, dtype)
        return
    absmax = absmax_of(state).view(out_features, in_features // block)
    stream = packed.view(torch.uint8).reshape(out_features, in_features // 2)
    step = max(block, columns_per_block // block * block)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        yield start, stop, dequantize_flat(stream[:, start // 2:stop // 2].contiguous(),
                                           absmax[:, start // block:stop // block].contiguous().view(-1),
                                           block, state.quant_type, (out_features, stop - start), dtype)


@functools.cache
def cpu_kernel_reads_rows_flat(width: int, blocksize: int = 64) -> bool:
    """Whether bitsandbytes' CPU kernel dequantises a 2-D weight of this width correctly.

    False on AVX-512 CPUs with bitsandbytes 0.50.2 when ``width`` is not a multiple of ``blocksize``:
    a 4-bit layer of that width then computes with wrong weights in bitsandbytes' own forward.
    """
    import bitsandbytes.functional as bnbf

    w = torch.linspace(-1, 1, 4 * width).reshape(4, width)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    return torch.equal(bnbf.dequantize_4bit(packed, state), dequantize(packed, state))


_PATCHED = False


def read_rows_flat_on_cpu() -> bool:
    """Make bitsandbytes' CPU ``dequantize_4bit`` read the packed stream flat, if it does not.

    Where :func:`cpu_kernel_reads_rows_flat` fails for some width, bitsandbytes' own forward of a
    4-bit layer of that width (and PEFT's DoRA norm) compute with wrong weights. This registers
    bitsandbytes' own pure-torch implementation (its ``default`` backend, which it also uses for odd
    widths) as the CPU kernel instead: slower, and the same numbers as the CUDA kernel. Called by the
    CPU backend before it loads a 4-bit model; returns whether the kernel was replaced.
    """
    global _PATCHED
    if _PATCHED or all(cpu_kernel_reads_rows_flat(width) for width in (96, 160, 200)):
        return _PATCHED
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit_flat(A, absmax, blocksize, quant_type, shape, dtype):
        A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        return _dequantize_4bit_compute(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                                        blocksize, shape, dtype)

    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore", UserWarning)
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit_flat)
    _PATCHED = True
    cpu_kernel_reads_rows_flat.cache_clear()
    return True


def exact_on_cpu(model: Any) -> Any:
    """Keep a 4-bit model's CPU forward in its compute dtype, reading weights flat; returns the model.

    On a CPU with AVX-512 BF16, bitsandbytes' ``Linear4bit`` switches itself in eval mode without
    gradients to a repacked bf16 kernel: a model loaded in fp32 then scores and generates in bf16
    (seen: max |Δ logit| 0.25 on the tiny Gemma-3 against the same weights in fp32), so the held-out
    loss and the merge check would depend on the CPU. The switch is turned off per layer, and the
    dequantisation kernel made to read flat (:func:`read_rows_flat_on_cpu`).
    """
    read_rows_flat_on_cpu()
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def dequant_dtype_of(model: Any) -> str | None:
    """The dtype ``model``'s 4-bit layers dequantise in (their ``quant_state.dtype``; None without
    any). The merge reproduces it: Unsloth on a T4 loads in fp16, then computes Gemma-3 in fp32."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            return str(state.dtype).removeprefix("torch.")
    return None
