"""W·Aᵀ straight from bitsandbytes' packed NF4 codes (Triton), for fast DoRA's norm refresh.

Why: once per optimizer step the refresh needs ``W Aᵀ`` (out × r) for every projection
(:func:`trinity_core.train.fast_dora.linear.refresh_after_step`). Dequantising each W to 16 bits
first and then multiplying writes and reads 2 bytes per weight on top of the ½ byte of packed codes
(~48 GB per step at 48 layers of the 12B shape, 47–61 ms on an H100/H200). This kernel reads the
packed codes once and never writes W to memory: ~5.4 GB, one launch per stack of same-shaped
projections.

Layout (bitsandbytes 0.50, ``Params4bit``): the data is one flat row-major stream of out·in
4-bit codes, two a byte, element 2i in the HIGH nibble of byte i and 2i+1 in the low one; one
absmax per ``blocksize`` elements of that stream. With double quantisation (``state.nested``, what
Unsloth's pre-quantised checkpoints use) the absmax are uint8 codes:
``absmax_b = state2.code[q_b] · state2.absmax[b // state2.blocksize] + state.offset``.

The kernel: one program per (BLOCK_M rows, projection) walks ``in`` in chunks of CHUNK elements,
CHUNK dividing both ``in`` and the blocksize, so each row's chunk lies in one quantisation block
and has one scale. Each weight is its NF4 value times its row's scale, formed in registers: the high
(even-column) and low (odd-column) nibbles separately, then multiplied against A's even and odd
columns (``tl.dot``, fp32 accumulation, into one accumulator across chunks). The packed stream,
absmax and nested state of each projection come from a small table of addresses, so one launch
serves a whole stack. A is read once beforehand (:func:`_a_kernel`) into that split layout, in the
GEMM dtype, with A·Aᵀ for the norm; the norm's W-free part is its own small kernel
(:func:`_size_kernel`).

Precision: a 16-bit GEMM runs in fp16 on the tensor cores, whatever 16-bit type W and A have: each
weight is the fp16 NF4 value times the block's scale rounded to fp16, the product rounded once
(``mul.rn.f16x2``); the result is W dequantised to fp16 within ~1.5 fp16 ulps, closer to bitsandbytes'
fp32 weights than dequantising to bf16 and multiplying (the old path, and PEFT's). bf16 A converts to
fp16 exactly (LoRA A is ≪ fp16's 65504 limit; a non-finite result is caught by the refresh, which
then recomputes those rows from dequantised weights), and products accumulate in fp32. An fp32 GEMM
(a model that computes in fp32) uses the fp32 table and IEEE fp32 products, on FMA units (not timed
against cuBLAS). The nested scale is bitsandbytes' to the bit (its product unfused).

The lookup, compiled (PRMT): ``prmt`` byte permutes from the 16 values' bytes held in 8 registers
(:data:`NF4_PRMT_ASM`: 26 instructions for 8 weights, their scaling included). The first version
gathered from the 16 values in registers (``tl.gather``), which Triton lowers to one warp shuffle a
weight, and ran at 8.6 instructions a weight a thread with 255 registers
(bench/results/2026-11-28-cpu-norm_refresh-sass.jsonl); with ``prmt``, the scale applied to the
weights (one accumulator, not a per-chunk partial product) and A padded so its tiles load without a
mask: 5.6 instructions and 168 registers (``python bench/norm_refresh.py --sass``, sm_90a,
bench/results/2026-11-29-cpu-norm_refresh-sass-prmt.jsonl). On an H200 the 48 layers' kernels went
from 8.5 to 5.7 ms (bench/results/2026-11-28-h200-norm_refresh-{4,5}.jsonl). A lookup with one load
per packed byte from a 256-entry table of fp16 pairs (commit bf1315e, since removed) had been slower
than the gather: 10.4 against 8.8 ms. Under Triton's interpreter (CPU tests) the gather runs, with the same arithmetic.

It runs on CUDA GPUs of compute capability ≥ 8.0, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, for the tests). :func:`why_not` names what it does not take (no Triton,
a T4, FP4, a CPU-packed weight, widths no chunk of ≥ 32 divides, unaligned buffers…); the caller
then keeps the dequantise-and-mm path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

try:  # module globals: Triton's interpreter finds ``tl`` in the kernel function's globals
    import triton
    import triton.language as tl
except ImportError:  # the kernel is then never asked for (why_not says so)
    triton = tl = None

TABLE_COLUMNS = 5
"""Addresses per projection in the kernel's table: packed codes, absmax, nested absmax, nested
code table, nested offset (the last three 0 without double quantisation)."""


MAX_R = 128
"""Largest LoRA rank the kernel takes: its accumulator is BLOCK_M × r fp32 in registers (the recipe
uses 64; its OOM ladder goes down to 32)."""


NF4_PRMT_ASM = """{
.reg .b32 sel, pick, sel1, pick1, lo0, hi0, lo1, hi1, x, y;
and.b32 sel, $4, 0x77777777;
shr.b32 pick, $4, 1;
and.b32 pick, pick, 0x44444444;
or.b32 pick, pick, 0x32103210;
shr.b32 sel1, sel, 16;
shr.b32 pick1, pick, 16;
prmt.b32 x, $7, $11, sel; prmt.b32 y, $15, $19, sel; prmt.b32 lo0, x, y, pick;
prmt.b32 x, $23, $27, sel; prmt.b32 y, $31, $35, sel; prmt.b32 hi0, x, y, pick;
prmt.b32 x, $7, $11, sel1; prmt.b32 y, $15, $19, sel1; prmt.b32 lo1, x, y, pick1;
prmt.b32 x, $23, $27, sel1; prmt.b32 y, $31, $35, sel1; prmt.b32 hi1, x, y, pick1;
prmt.b32 $0, lo0, hi0, 0x7351; prmt.b32 $1, lo1, hi1, 0x7351;
prmt.b32 $2, lo0, hi0, 0x6240; prmt.b32 $3, lo1, hi1, 0x6240;
mul.rn.f16x2 $0, $0, $5; mul.rn.f16x2 $1, $1, $6;
mul.rn.f16x2 $2, $2, $5; mul.rn.f16x2 $3, $3, $6;
}"""
"""PTX for 4 packed bytes (8 NF4 codes) at a time: their fp16 weights, high nibbles ($0, $1) and low
nibbles ($2, $3), each times its row's scale ($5 for bytes 0–1, $6 for bytes 2–3: in the tensor-core
operand layout a thread's 4 elements span 2 rows). A 16-entry lookup is ``prmt`` (byte permute, 8
bytes × 4 selectors a instruction) into entries 0–7 and 8–15 of a byte table ($7…$35: the low bytes
of the 16 fp16 values, then the high bytes, :func:`byte_tables`; every fourth operand, as Triton
passes a 32-bit scalar once per packed element), then a ``prmt`` that picks between the two by each
code's bit 3 (llama.cpp's ``get_int_from_table_16`` does the same for int8 tables), then one that
joins low and high bytes into fp16 pairs: 26 ALU instructions for 8 weights and no shuffles, where
``tl.gather`` from registers lowers to one warp shuffle per weight."""
NF4_PRMT_CONSTRAINTS = "=r,=r,=r,=r,r,r,r" + ",r" * 32
if tl is not None:  # a Triton kernel reads module globals only as constexprs
    NF4_PRMT_ASM, NF4_PRMT_CONSTRAINTS = tl.constexpr(NF4_PRMT_ASM), tl.constexpr(NF4_PRMT_CONSTRAINTS)


class UnsupportedNf4Weight(ValueError):
    """The kernel cannot take this weight or input; the message says why (the caller's fallback is
    dequantise-then-multiply, ``trinity_core.nf4.row_blocks``)."""


def interpreting() -> bool:
    """Whether Triton's interpreter runs kernels (``TRITON_INTERPRET=1``): they then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    return triton is not None


def why_not(weights: Sequence[Any], device: torch.device) -> str | None:
    """None when :func:`nf4_times_stacked` takes these same-shaped ``Params4bit`` weights for A on
    ``device``; else the reason, in words."""
    return _check(weights, device)[0]


def _check(weights: Sequence[Any], device: torch.device) -> tuple[str | None, list]:
    """(why not, or None; each weight's remembered check). The refresh asks for 336 projections
    every optimizer step, so a weight's check is kept on the weight itself (:func:`_checked`)."""
    if not weights:
        return "no weights", []
    if not _triton_available():
        return "Triton is not installed", []
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"{device.type} tensors (the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1)", []
    if device.type == "cuda" and _capability(device) < (8, 0):
        return (f"compute capability {_capability(device)}: Triton's tensor-core dot needs 8.0 (compiled for "
                "sm_75 it multiplies on FMA units and spills registers; cuBLAS uses the tensor cores)"), []
    # Params4bit's __torch_function__ makes each data_ptr() ~2 µs (0.7 ms a refresh); plain: ~0.2 µs
    with torch._C.DisableTorchFunctionSubclass():
        checked = [_checked(weight, device) for weight in weights]
    for found in checked:
        if found.reason is not None:
            return found.reason, checked
        if found.signature != checked[0].signature:
            return "projections of one stack differ in shape or quantisation settings", checked
    return None, checked


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class _Checked:
    """What :func:`why_not` found for one weight on one device, and its row of the address table."""

    __slots__ = ("key", "reason", "signature", "addresses")

    def __init__(self, key: tuple, reason: str | None, signature: tuple | None, addresses: tuple | None):
        self.key, self.reason, self.signature, self.addresses = key, reason, signature, addresses


def _checked(weight: Any, device: torch.device) -> _Checked:
    """The weight's check, redone when its data, quant state or absmax moved (``QuantState.to``
    moves its tensors in place); the key holds the state itself, so its id cannot be reused."""
    state = getattr(weight, "quant_state", None)
    key = (weight.data_ptr(), device, state, None if state is None else state.absmax.data_ptr())
    found = getattr(weight, "_trinity_nf4_check", None)
    if found is None or found.key != key:
        reason = _why_not_one(weight, device)
        state = weight.quant_state if reason is None else None
        found = _Checked(key, reason, None if state is None else _signature(state),
                         None if state is None else _addresses(weight))
        try:
            weight._trinity_nf4_check = found
        except AttributeError:  # a plain tensor without __dict__: checked every time (never taken)
            pass
    return found


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when the current device is 0 (``torch.device`` compares
    them unequal: the GPU run of 2026-11-28 refused every weight a test made with ``device="cuda"``)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a.index == b.index
    return (a.index if a.index is not None else torch.cuda.current_device()) == (
        b.index if b.index is not None else torch.cuda.current_device())


def _why_not_one(weight: Any, device: torch.device) -> str | None:
    state = getattr(weight, "quant_state", None)
    if weight.__class__.__name__ != "Params4bit" or state is None:
        return "not a bitsandbytes Params4bit"
    if state.quant_type != "nf4":
        return f"quant_type {state.quant_type!r} (only nf4)"
    if getattr(weight, "packing_format_for_cpu", False) or getattr(state, "packing_format_for_cpu", False):
        return "repacked for bitsandbytes' CPU kernel"
    if len(state.shape) != 2:
        return f"weight shape {tuple(state.shape)} is not 2-D"
    if chunk_elements(state) is None:
        return (f"in_features {state.shape[1]} and blocksize {state.blocksize} share no chunk of 32 or 64 "
                "elements")
    tensors = [weight.data, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
        if state.absmax.dtype != torch.uint8 or state.state2.code.numel() != 256:
            return "nested absmax is not uint8 codes with a 256-entry table"
        if state.state2.absmax.dtype != torch.float32 or state.state2.code.dtype != torch.float32:
            return "nested absmax state is not fp32"
        if not torch.is_tensor(state.offset) or state.offset.dtype != torch.float32:
            return "nested offset is not an fp32 tensor"
    elif state.absmax.dtype != torch.float32:
        return f"absmax dtype {state.absmax.dtype} (fp32 expected)"
    for t in tensors:
        if not _same_device(t.device, device):
            return f"quantisation state on {t.device}, A on {device}"
        if not t.is_contiguous() or t.data_ptr() % 16:
            return "a quantisation buffer is not contiguous and 16-byte aligned"
    if weight.data.numel() * weight.data.element_size() * 2 < state.shape[0] * state.shape[1]:
        return "packed data is shorter than the weight's shape needs"
    return None  # the packed data may be stored in any dtype (quant_storage): the kernel reads its bytes


def _addresses(weight: Any) -> tuple:
    """The weight's row of the kernel's address table (see TABLE_COLUMNS)."""
    state = weight.quant_state
    if state.nested:
        return (weight.data_ptr(), state.absmax.data_ptr(), state.state2.absmax.data_ptr(),
                state.state2.code.data_ptr(), state.offset.data_ptr())
    return weight.data_ptr(), state.absmax.data_ptr(), 0, 0, 0


def _signature(state: Any) -> tuple:
    """What the kernel is compiled for: projections of one launch must agree on it."""
    nested = (state.state2.blocksize,) if state.nested else ()
    return tuple(state.shape), state.blocksize, state.nested, nested


def chunk_elements(state: Any) -> int | None:
    """Elements of a row the kernel takes per scale: 64 or 32, dividing both in_features and the
    blocksize (so a chunk never crosses a quantisation block); None where neither does."""
    in_features = state.shape[1]
    for chunk in (64, 32):
        if in_features % chunk == 0 and state.blocksize % chunk == 0:
            return chunk
    return None


def nf4_times(weight: Any, quant_state: Any, a_t: torch.Tensor) -> torch.Tensor:
    """``W @ a_t`` (out × r, fp32) for the NF4 ``weight`` (a ``Params4bit``, out × in) and
    ``a_t`` (in × r, bf16/fp16/fp32), without dequantising W: ``nf4.dequantize(weight, state) @ a_t``
    up to the GEMM precision of ``a_t``'s dtype (module docstring). Raises
    :class:`UnsupportedNf4Weight` saying why where the kernel cannot take it."""
    if getattr(weight, "quant_state", None) is not quant_state:
        raise UnsupportedNf4Weight("quant_state is not this weight's quant_state")
    if a_t.dim() != 2 or a_t.shape[0] != quant_state.shape[1]:
        raise UnsupportedNf4Weight(f"a_t has shape {tuple(a_t.shape)}; expected "
                                   f"(in_features={quant_state.shape[1]}, r)")
    return nf4_times_stacked([weight], a_t.mT.unsqueeze(0), a_t.dtype)[0]


def nf4_times_stacked(weights: Sequence[Any], a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_l @ A_lᵀ`` for each same-shaped NF4 weight ``W_l`` (out × in) and ``a[l]`` (r × in), as
    one (L, out, r) fp32 tensor, in one kernel launch. ``dtype`` picks the GEMM: bf16 or fp16 → fp16
    tensor-core products, fp32 → IEEE fp32 (see the module docstring). Raises
    :class:`UnsupportedNf4Weight` saying why where the kernel cannot take them."""
    out = nf4_times_stacked_or_none(weights, a, dtype)
    if out is None:
        reason = why_not(weights, a.device) or f"r = {a.shape[1]} > {MAX_R}"
        raise UnsupportedNf4Weight(f"the NF4 kernel cannot take these weights: {reason}")
    return out


def nf4_times_stacked_or_none(weights: Sequence[Any], a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`nf4_times_stacked`, or None where the kernel cannot take the weights (one check pass)."""
    prepared = _launch_or_none(weights, a, dtype)
    if prepared is None:
        return None
    launch = prepared[0]
    count, out_features, r = a.shape[0], weights[0].quant_state.shape[0], a.shape[1]
    out = torch.empty((count, out_features, r), device=a.device, dtype=torch.float32)
    launch(out, fused=None)
    return out


def nf4_row_norms_or_none(weights: Sequence[Any], a: torch.Tensor, b: torch.Tensor, w2: torch.Tensor,
                          scaling: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fast DoRA's factored squared row norms of ``W_l + s_l·B_l A_l`` for same-shaped NF4 weights, in
    three launches (A's pass, the W-free term, the NF4 kernel with the cross term in its epilogue), W Aᵀ
    never leaving the kernel: ``(n2, size)``, each (L, out) fp32, with

        n2   = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ      (the squared norm)
        size = ‖W_i‖² + s²·B_i (A Aᵀ) B_iᵀ                       (its scale, for the cancellation check)

    ``a`` (L, r, in) and ``b`` (L, out, r) in any float dtype (read as fp32 in the epilogue), ``w2``
    (L, out) fp32 ``‖W_i‖²``, ``scaling`` (L,) fp32. ``dtype`` picks the GEMM as in
    :func:`nf4_times_stacked`. None where the kernel cannot take the weights (the caller then
    multiplies dequantised rows). The epilogue saves the (L, out, r) fp32 W Aᵀ round trip through
    memory and ~6 elementwise passes over it (~1.3 GB per refresh at 48 layers of the 12B shape)."""
    state = getattr(weights[0], "quant_state", None) if weights else None
    count, out_features = a.shape[0], state.shape[0] if state is not None else None
    if state is not None and (b.shape != (count, out_features, a.shape[1]) or w2.shape != (count, out_features)
                              or scaling.shape != (count,)):
        raise UnsupportedNf4Weight(f"b {tuple(b.shape)}, w2 {tuple(w2.shape)}, scaling {tuple(scaling.shape)} do not "
                                   f"fit {count} weights of {out_features} rows and r = {a.shape[1]}")
    prepared = _launch_or_none(weights, a, dtype, with_aat=True)
    if prepared is None:
        return None
    launch, aat = prepared
    b, scaling = b.contiguous(), scaling.float().contiguous()
    size = torch.empty((count, out_features), device=a.device, dtype=torch.float32)
    _size_kernel_jit(interpreting())[(-(-out_features // 64), count)](
        b, aat, w2.float().contiguous(), scaling, size, out_features, a.shape[1], BLOCK_M=64, R_PAD=_r_pad(a.shape[1]),
        num_warps=4)
    n2 = torch.empty_like(size)
    launch(n2, fused=(b, scaling, size))
    return n2, size


def _r_pad(r: int) -> int:
    """The kernel's column count for rank r: a power of two ≥ 16 (a tensor-core dot's smallest N)."""
    return max(16, 1 << (r - 1).bit_length())


def _launch_or_none(weights: Sequence[Any], a: torch.Tensor, dtype: torch.dtype, with_aat: bool = False):
    """The checks and A's layout for one launch over ``weights``: ``(launch, aat)``, a function
    ``launch(out, fused)`` that runs the kernel and, with ``with_aat``, A·Aᵀ (L, r_pad, r_pad) fp32 zero-padded;
    or None where the kernel cannot take the weights."""
    reason, checked = _check(weights, a.device)
    if reason is not None or a.shape[1] > MAX_R:
        return None
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedNf4Weight(f"GEMM dtype {dtype}: bf16, fp16 or fp32 only")
    state = weights[0].quant_state
    out_features, in_features = state.shape
    if a.dim() != 3 or a.shape[0] != len(weights) or a.shape[2] != in_features:
        raise UnsupportedNf4Weight(f"a has shape {tuple(a.shape)}; expected ({len(weights)}, r, {in_features})")
    count, r = a.shape[0], a.shape[1]
    gemm_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    r_pad = _r_pad(r)
    a_split, aat = _prepared(a, gemm_dtype, r_pad, with_aat)
    ptx = a.device.type == "cuda"  # compiled, not interpreted
    prmt = ptx and gemm_dtype == torch.float16
    codes = byte_tables(a.device) if prmt else code_table(a.device, gemm_dtype)
    config = launch_config(out_features, gemm_dtype)
    grid = (-(-out_features // config["BLOCK_M"]), count)
    table = _table_of(tuple(found.addresses for found in checked), a.device)

    def launch(out: torch.Tensor, fused: tuple | None) -> None:
        b, scaling, size = fused if fused is not None else (out,) * 3  # unused unless FUSED
        _kernel(interpreting())[grid](
            table, a_split, codes, out, b, scaling, size, out_features, r,
            K=in_features, BLOCKSIZE=state.blocksize, BLOCKSIZE2=state.state2.blocksize if state.nested else 1,
            NESTED=state.nested, CHUNK=chunk_elements(state), R_PAD=r_pad, FUSED=fused is not None, PTX=ptx, PRMT=prmt,
            **config)

    return launch, aat


def _prepared(a: torch.Tensor, gemm_dtype: torch.dtype, r_pad: int, with_aat: bool):
    """One pass over A (L, r, in), any float dtype (:func:`_a_kernel`): its even and odd columns, each
    transposed and zero-padded to r_pad, (L, 2, in/2, r_pad) in ``gemm_dtype``, so the NF4 kernel loads a
    chunk's two halves as plain tiles without a mask; and with ``with_aat`` A·Aᵀ, (L, r_pad, r_pad) fp32,
    summed over chunks of A's width. Done in torch (a permuting copy, a bf16 → fp32 copy and a batched
    fp32 GEMM that cuBLAS runs on FMA units in 32 × 32 tiles) these took 2.2 of the refresh's 9.9 ms at 48
    layers of the 12B shape (bench/results/2026-11-28-h200-norm_refresh-6-profile.jsonl)."""
    count, r, in_features = a.shape
    width = next(c for c in (128, 64, 32) if in_features % c == 0)  # in_features is a multiple of 32
    a_split = torch.empty((count, 2, in_features // 2, r_pad), device=a.device, dtype=gemm_dtype)
    parts = torch.empty((count, in_features // width, r_pad, r_pad) if with_aat else (1,), device=a.device,
                        dtype=torch.float32)
    _a_kernel_jit(interpreting())[(in_features // width, count)](
        a.contiguous(), a_split, parts, r, K=in_features, WIDTH=width, R_PAD=r_pad, AAT=with_aat, num_warps=4)
    return a_split, parts.sum(1) if with_aat else None


def launch_config(out_features: int, gemm_dtype: torch.dtype) -> dict:
    """Tile sizes by shape and GEMM dtype, fixed. 16-bit GEMMs of ≥ 1024 rows: 128 rows × 4 warps, 3
    stages. With the prmt lookup, ``bench/norm_refresh.py --sweep``'s 8 configurations put it and 64 rows ×
    4 warps × 3 stages within noise of each other for the 48 layers' fused kernels, summed over the 5
    12B shapes (H200: 6.63 / 6.61 ms in run 7, 6.75 / 6.84 ms in run 10,
    bench/results/2026-11-28-h200-norm_refresh-{7,10}.jsonl; the others up to 3× slower). Smaller
    widths keep 64 rows × 4 warps (not swept); the fp32 FMA dot needs ~190 registers a thread, hence 64
    rows × 4 warps."""
    if gemm_dtype == torch.float32:
        return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2}
    if out_features >= 1024:
        return {"BLOCK_M": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=256)
def _table_of(rows: tuple, device: torch.device) -> torch.Tensor:
    """(L, TABLE_COLUMNS) int64 addresses on ``device``, cached by the addresses themselves
    (frozen weights keep them: one copy to the device per stack, not per step)."""
    return torch.tensor(rows, dtype=torch.int64).to(device)


@functools.cache
def code_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 16 NF4 values (the table its dequantisation kernels use) in ``dtype``."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device=device).to(dtype).contiguous()


@functools.cache
def byte_tables(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values in fp16 (:func:`code_table`) as the PRMT lookup's 8 int32 registers: 4 holding
    the values' low bytes (entry j in byte j % 4 of register j // 4), then 4 their high bytes."""
    bits = code_table(torch.device("cpu"), torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    words = [sum(int(half[j]) << (8 * (j % 4)) for j in range(4 * i, 4 * i + 4))
             for half in (bits & 0xFF, bits >> 8) for i in range(4)]
    return torch.tensor(words, dtype=torch.int64).to(torch.int32).to(device)  # bit patterns, wrapped


@functools.cache
def _kernel(interpret: bool):
    """The Triton kernel, compiled or interpreted on CPU tensors: ``interpret`` is part of the
    cache key because ``triton.jit`` picks the interpreter when it wraps the function."""
    return triton.jit(_nf4_times_kernel)


def _nf4_times_kernel(table_ptr, a_ptr, code_ptr, out_ptr, b_ptr, s_ptr, size_ptr, N, R,
                      K: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                      BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, R_PAD: tl.constexpr, FUSED: tl.constexpr,
                      PTX: tl.constexpr, PRMT: tl.constexpr):
    """out[l] (N × R, fp32) = W_l · A_lᵀ for program (row tile, l). ``table_ptr``: (L, 5) addresses
    (see TABLE_COLUMNS); ``a_ptr``: (L, 2, K/2, R_PAD), A's even then odd columns, transposed, zero-padded
    to R_PAD columns, in the GEMM dtype; ``code_ptr``: the 16 NF4 values in that dtype, or with PRMT
    (compiled 16-bit GEMMs) the 8 int32 byte tables of :func:`byte_tables`. K is a compile-time constant
    (one compile per width; Triton 3.6's interpreter also cannot loop to a runtime bound under numpy 2).
    PTX: compiled for CUDA, so inline PTX may be used (the interpreter runs none): the lookup with PRMT, and
    the nested scale's product unfused, so each block's scale is bitsandbytes' to the bit (a fused
    multiply-add can differ by an ulp, which the scale's fp16 rounding can turn into 2⁻¹¹).
    FUSED: instead, out[l] (N, fp32) = size[l] + 2s·Σ_r B⊙(W Aᵀ), from ``b_ptr`` (L, N, R, any float),
    ``s_ptr`` (L,) fp32 and ``size_ptr`` (L, N) fp32, which :func:`_size_kernel` filled
    (:func:`nf4_row_norms_or_none`)."""
    layer = tl.program_id(1)
    entry = table_ptr + layer * 5
    packed = tl.multiple_of(tl.load(entry).to(tl.pointer_type(tl.uint8)), 16)
    if NESTED:
        absmax_q = tl.load(entry + 1).to(tl.pointer_type(tl.uint8))
        absmax2 = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
        code2 = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
        offset = tl.load(tl.load(entry + 4).to(tl.pointer_type(tl.float32)))
    else:
        absmax = tl.load(entry + 1).to(tl.pointer_type(tl.float32))

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    half = tl.arange(0, CHUNK // 2)
    a_even = a_ptr + layer.to(tl.int64) * K * R_PAD + cols[None, :]
    a_odd = a_even + (K // 2) * R_PAD
    if PRMT:  # the byte tables (byte_tables()): loaded once, held in 8 registers by the inline assembly
        lut = code_ptr.to(tl.pointer_type(tl.int32))
        l0, l1, l2, l3 = tl.load(lut), tl.load(lut + 1), tl.load(lut + 2), tl.load(lut + 3)
        h0, h1, h2, h3 = tl.load(lut + 4), tl.load(lut + 5), tl.load(lut + 6), tl.load(lut + 7)
    else:
        codes = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_M, 16))
    # tl.zeros is itself a jit function: the interpreter runs those only when TRITON_INTERPRET was
    # set before triton was imported; tl.full is a builtin
    acc = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    for k in range(0, K, CHUNK):
        first = rows * K + k  # flat index of each row's chunk: it lies in one quantisation block
        block = first // BLOCKSIZE
        if NESTED:  # as bitsandbytes: code2[q] · absmax2 rounded, then + offset
            q = tl.load(absmax_q + block, mask=row_ok, other=0).to(tl.int32)
            code, absmax_2 = tl.load(code2 + q), tl.load(absmax2 + block // BLOCKSIZE2, mask=row_ok, other=0.0)
            if PTX:  # mul.rn is never fused into an FMA with the add (the interpreter's numpy never fuses)
                scale = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [code, absmax_2],
                                                  dtype=tl.float32, is_pure=True, pack=1)
            else:
                scale = code * absmax_2
            scale = scale + offset
        else:
            scale = tl.load(absmax + block, mask=row_ok, other=0.0)
        byte_at = tl.multiple_of(first // 2, CHUNK // 2)
        byte = tl.load(packed + byte_at[:, None] + half[None, :], mask=row_ok[:, None], other=0)
        a_rows = (k // 2 + half).to(tl.int64)[:, None] * R_PAD  # A is padded to R_PAD columns: no mask
        even = tl.load(a_even + a_rows)
        odd = tl.load(a_odd + a_rows)
        if PRMT:
            w_even, w_odd = tl.inline_asm_elementwise(
                NF4_PRMT_ASM, NF4_PRMT_CONSTRAINTS,
                [byte, scale.to(tl.float16)[:, None], l0, l1, l2, l3, h0, h1, h2, h3],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            w_scale = scale.to(codes.dtype)[:, None]
            w_even = tl.gather(codes, (byte >> 4).to(tl.int32), 1) * w_scale
            w_odd = tl.gather(codes, (byte & 15).to(tl.int32), 1) * w_scale
        acc = tl.dot(w_even, even, acc, input_precision="ieee")
        acc = tl.dot(w_odd, odd, acc, input_precision="ieee")
    if FUSED:  # size_ptr holds ‖W_i‖² + s²·B_i AAᵀ B_iᵀ (_size_kernel): only B·(W Aᵀ) is left
        tile_ok = row_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptr + layer.to(tl.int64) * N * R + rows[:, None] * R + cols[None, :], mask=tile_ok,
                    other=0.0).to(tl.float32)
        at = layer.to(tl.int64) * N + rows
        size = tl.load(size_ptr + at, mask=row_ok, other=0.0)
        cross = tl.reduce(b * acc, 1, tl.standard._sum_combine)
        tl.store(out_ptr + at, size + 2.0 * tl.load(s_ptr + layer) * cross, mask=row_ok)
    else:
        out = out_ptr + layer.to(tl.int64) * N * R + rows[:, None] * R + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _size_kernel_jit(interpret: bool):
    """:func:`_size_kernel`, compiled or interpreted (see :func:`_kernel`)."""
    return triton.jit(_size_kernel)


def _size_kernel(b_ptr, aat_ptr, w2_ptr, s_ptr, size_ptr, N, R, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """size[l] (N, fp32) = w2[l] + s²·Σ_r (B·AAᵀ)⊙B for program (row tile, l), AAᵀ (L, R_PAD, R_PAD)
    zero-padded (:func:`_a_kernel`): the part of the squared norm that does not need W. Its own launch:
    in the NF4 kernel's epilogue its 64 × 64 dot raised the whole kernel's registers (the gather kernel
    with that epilogue: 255 a thread and 196 bytes of spill,
    bench/results/2026-11-28-cpu-norm_refresh-sass.jsonl; the prmt kernel with only the cross term in
    its epilogue: 168, bench/results/2026-11-29-cpu-norm_refresh-sass-prmt.jsonl)."""
    layer = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    b = tl.load(b_ptr + layer.to(tl.int64) * N * R + rows[:, None] * R + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    aat = tl.load(aat_ptr + layer.to(tl.int64) * R_PAD * R_PAD + cols[:, None] * R_PAD + cols[None, :])  # padded
    # tl.reduce with the sum's combine function, not tl.sum: that is a jit function (see _nf4_times_kernel);
    # tf32x3: three TF32 products, ~fp32 accuracy on the tensor cores (an IEEE fp32 dot spilled registers)
    quad = tl.reduce(tl.dot(b, aat, input_precision="tf32x3") * b, 1, tl.standard._sum_combine)  # B_i AAᵀ B_iᵀ
    s = tl.load(s_ptr + layer)
    at = layer.to(tl.int64) * N + rows
    tl.store(size_ptr + at, tl.load(w2_ptr + at, mask=row_ok, other=0.0) + s * s * quad, mask=row_ok)


@functools.cache
def _a_kernel_jit(interpret: bool):
    """:func:`_a_kernel`, compiled or interpreted (see :func:`_kernel`)."""
    return triton.jit(_a_kernel)


def _a_kernel(a_ptr, split_ptr, part_ptr, R, K: tl.constexpr, WIDTH: tl.constexpr, R_PAD: tl.constexpr,
              AAT: tl.constexpr):
    """Program (chunk j, layer l) takes A[l][:, j·WIDTH : (j+1)·WIDTH] (R × WIDTH, any float dtype) and
    writes its even and odd columns transposed into split[l, 0] and split[l, 1] (each K/2 × R_PAD, in
    split's dtype, rows ≥ R zero); with AAT also the chunk's A·Aᵀ (R_PAD × R_PAD fp32, tf32x3: ~fp32
    accuracy) into part[l, j], which the caller sums over j (:func:`_prepared`)."""
    chunk = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, R_PAD)
    cols = chunk * WIDTH + tl.arange(0, WIDTH)
    a = tl.load(a_ptr + layer * R * K + rows[:, None] * K + cols[None, :], mask=(rows < R)[:, None],
                other=0.0).to(tl.float32)
    if AAT:
        part = tl.dot(a, tl.trans(a), input_precision="tf32x3")
        at = part_ptr + (layer * (K // WIDTH) + chunk) * R_PAD * R_PAD
        tl.store(at + rows[:, None] * R_PAD + rows[None, :], part)
    even, odd = tl.split(tl.reshape(a, (R_PAD, WIDTH // 2, 2)))
    half = chunk * (WIDTH // 2) + tl.arange(0, WIDTH // 2)
    dst = split_ptr + layer * K * R_PAD + half[None, :] * R_PAD + rows[:, None]
    tl.store(dst, even.to(split_ptr.dtype.element_ty))
    tl.store(dst + (K // 2) * R_PAD, odd.to(split_ptr.dtype.element_ty))

__all__ = ["MAX_R", "UnsupportedNf4Weight", "chunk_elements", "code_table", "interpreting", "launch_config", "nf4_times",
           "nf4_row_norms_or_none", "nf4_times_stacked", "nf4_times_stacked_or_none", "why_not"]
