"""The NF4 kernel's reference product, shared by its CPU (Triton interpreter) and GPU tests."""

from __future__ import annotations

import torch

from trinity_core import nf4
from trinity_core.train.fast_dora import nf4_matmul


def mirrored_product(weight, a_t: torch.Tensor) -> torch.Tensor:
    """W·a_t in float64 from the packed stream itself, with the kernel's NF4 values and A's rounding."""
    state = weight.quant_state
    gemm_dtype = torch.float32 if a_t.dtype == torch.float32 else torch.float16
    numel = state.shape[0] * state.shape[1]
    stream = weight.data.view(torch.uint8).reshape(-1)
    q = torch.stack([stream >> 4, stream & 15], 1).reshape(-1)[:numel].long()  # high nibble first
    codes = nf4_matmul.code_table(stream.device, gemm_dtype).double()[q]
    scales = nf4.absmax_of(state).double().repeat_interleave(state.blocksize)[:numel]
    return (codes * scales).reshape(state.shape) @ a_t.to(gemm_dtype).double()
