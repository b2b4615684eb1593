"""The NF4 kernel's reference product, shared by its CPU (Triton interpreter) and GPU tests."""

from __future__ import annotations

import torch

from trinity_core import nf4
from trinity_core.train.fast_dora import nf4_matmul


def mirrored_product(weight, a_t: torch.Tensor) -> torch.Tensor:
    """W·a_t in float64 from the packed stream itself, with the kernel's arithmetic: each weight is its
    NF4 value times its block's scale, both in the GEMM dtype (fp16 for 16-bit GEMMs), the product
    rounded once to that dtype; A rounded to it; the rest exact."""
    state = weight.quant_state
    gemm_dtype = torch.float32 if a_t.dtype == torch.float32 else torch.float16
    numel = state.shape[0] * state.shape[1]
    stream = weight.data.view(torch.uint8).reshape(-1)
    q = torch.stack([stream >> 4, stream & 15], 1).reshape(-1)[:numel].long()  # high nibble first
    codes = nf4_matmul.code_table(stream.device, gemm_dtype)[q]
    scales = nf4.absmax_of(state).float().repeat_interleave(state.blocksize)[:numel]
    weights = (codes.to(gemm_dtype) * scales.to(gemm_dtype)).double()  # exact in fp32, then one rounding
    return weights.reshape(state.shape) @ a_t.to(gemm_dtype).double()
