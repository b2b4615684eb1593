"""GPU-only: Gemma-3's norm and attention prepare compiled by inductor (trinity_core.train.compiled_kernels)
against the eager arithmetic, in bf16 at the 12B shape's widths (hidden 3840; 16 query and 8 key/value heads of
256), forward and backward, for two sequence lengths from one graph each. Run on the lent GPU:

    PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu/test_compiled_kernels_cuda.py

The fused kernels round differently from eager (fp32 intermediates kept in registers, another reduction
order): each output and gradient is compared with the eager one computed in fp32 from the same bf16 inputs,
and must be as close to it as the eager bf16 result is, within a factor.
"""

from __future__ import annotations

import pytest
import torch

from trinity_core.train import compiled_kernels
from trinity_core.train.compiled_kernels import qkv_heads, rms_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 3840, 16, 8, 256


def _inputs(seq: int):
    gen = torch.Generator(device="cuda").manual_seed(seq)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(torch.bfloat16)

    angles = torch.arange(seq, device="cuda")[:, None] * torch.logspace(-4, 0, HEAD_DIM // 2, device="cuda")[None]
    emb = torch.cat([angles, angles], -1)[None]
    return dict(x=randn(seq, HIDDEN, scale=3.0), w=randn(HIDDEN, scale=0.5), q=randn(1, seq, HEADS * HEAD_DIM),
                k=randn(1, seq, KV_HEADS * HEAD_DIM), v=randn(1, seq, KV_HEADS * HEAD_DIM),
                cos=emb.cos().to(torch.bfloat16), sin=emb.sin().to(torch.bfloat16),
                qw=randn(HEAD_DIM, scale=0.5), kw=randn(HEAD_DIM, scale=0.5))


def _run(fn, t: dict, dtype: torch.dtype, which: str):
    """Outputs and input gradients of ``which`` ('norm' or 'prepare'), its inputs cast to ``dtype``."""
    names = ["x", "w"] if which == "norm" else ["q", "k", "v", "qw", "kw"]
    leaves = {n: t[n].to(dtype).requires_grad_() for n in names}
    if which == "norm":
        outs = (fn.rms_norm(leaves["x"], leaves["w"], 1e-6),)
    else:
        outs = fn.qkv_heads(leaves["q"], leaves["k"], leaves["v"], t["cos"].to(dtype), t["sin"].to(dtype),
                            leaves["qw"], leaves["kw"], 1e-6, 1e-6, HEADS, KV_HEADS)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen, device="cuda").to(dtype) for o in outs])
    return [o.detach().float() for o in outs] + [leaves[n].grad.float() for n in names]


@pytest.mark.parametrize("which", ["norm", "prepare"])
def test_inductor_kernels_are_as_close_to_fp32_as_eager_bf16(which):
    import types

    eager = types.SimpleNamespace(rms_norm=rms_norm, qkv_heads=qkv_heads)
    torch._dynamo.reset()
    compiled_kernels.compiled.cache_clear()
    fused = compiled_kernels.compiled("inductor")
    for seq in (1000, 4096):
        t = _inputs(seq)
        exact = _run(eager, t, torch.float32, which)
        for i, (got, ref, want) in enumerate(zip(_run(fused, t, torch.bfloat16, which),
                                                 _run(eager, t, torch.bfloat16, which), exact)):
            scale = want.abs().max().clamp_min(1e-30)
            err_fused = ((got - want).abs().max() / scale).item()
            err_eager = ((ref - want).abs().max() / scale).item()
            assert err_fused <= max(2 * err_eager, 1e-2), f"{which} seq {seq} #{i}: {err_fused:.2e} vs {err_eager:.2e}"
    compiled_kernels.compiled.cache_clear()
