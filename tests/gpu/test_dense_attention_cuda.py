"""GPU-only: the dense kernels of ``trinity_core.train.dense_attention`` (torch's FlashAttention-2 with a left
window, SDPA's cuDNN backend, cudnn-frontend's banded cuDNN kernel where it is importable) at Gemma-3 12B's heads (16 query, 8 key-value, dim 256), against an fp32 reference
with the mask flex attention applies, eagerly and inside a ``fullgraph`` compile. Run on the lent GPU:

    PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu/test_dense_attention_cuda.py
"""

from __future__ import annotations

import pytest
import torch

from trinity_core.train import dense_attention
from trinity_core.train.dense_attention import DenseAttention, expected_mask, pattern

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(seq, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, 16, seq, 256), (1, 8, seq, 256), (1, 8, seq, 256), (1, seq, 16, 256)]
    return [torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g) for s in shapes]


def _errors(run, q, k, v, dout, window):
    """Each of out, dq, dk, dv: largest error against the fp32 reference, relative to the reference's largest."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *leaves, attn_mask=expected_mask(q.shape[2], window, "cuda"), scale=256 ** -0.5, enable_gqa=True)
    ref.transpose(1, 2).backward(dout.float())
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = run(*xs)
    assert out.shape == (1, q.shape[2], 16, 256) and out.dtype == torch.bfloat16
    out.backward(dout)
    pairs = zip([out.detach()] + [t.grad for t in xs], [ref.detach().transpose(1, 2)] + [t.grad for t in leaves])
    return [((got.float() - want).abs().max() / want.abs().max()).item() for got, want in pairs]


def _check_dense(window, seq):
    """The dense path for ``pattern(window)``, eagerly and inside a ``fullgraph`` compile, against the reference at
    ``seq`` tokens; returns the eager function and its inputs."""
    dense = DenseAttention(flex=None)
    module = torch.nn.Module()
    q, k, v, dout = _inputs(seq)

    def eager(q, k, v):
        return dense(module, q, k, v, None, scaling=256 ** -0.5, dense_attention=pattern(window))[0]

    compiled = torch.compile(eager, fullgraph=True)
    for run in (eager, compiled):
        errors = _errors(run, q, k, v, dout, window)
        assert max(errors) < 2e-2, errors  # bf16 inputs and output; flex attention's are ~4e-3 (bench)
    assert dense.calls["dense"] >= 1 and dense.calls["flex"] == 0
    return eager, (q, k, v, dout)


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("window", [None, 256])
def test_dense_kernels_compute_the_masked_attention(monkeypatch, kernel, window):
    monkeypatch.setattr(dense_attention, "GLOBAL_KERNEL", kernel)
    monkeypatch.setattr(dense_attention, "SLIDING", True)
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "flash")  # FlashAttention-2's window (cuDNN's: below)
    _check_dense(window, 1024)


def test_a_wrong_window_would_be_seen(monkeypatch):
    """The comparison above tells a window one key off (what ``window_size_left = window - 1`` gets right)."""
    monkeypatch.setattr(dense_attention, "SLIDING", True)
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "flash")
    q, k, v, dout = _inputs(512)
    dense = DenseAttention(flex=None)
    module = torch.nn.Module()
    errors = _errors(lambda *x: dense(module, *x, None, scaling=256 ** -0.5, dense_attention=pattern(16))[0],
                     q, k, v, dout, 17)
    assert max(errors) > 5e-2, errors


@pytest.mark.parametrize("window", [16, 1024])
def test_cudnn_frontend_s_banded_kernel_computes_the_sliding_window(monkeypatch, window):
    """``SLIDING_KERNEL = "cudnn"`` (cudnn-frontend's ``torch.ops.cudnn.sdpa_fwd`` with ``window_left``): the masked
    attention, eagerly and inside a ``fullgraph`` compile, at 2048 tokens; with 16 keys a window one key off would be
    seen (with 1024 one key is ~0.1% of the weights, under the tolerance)."""
    if (error := dense_attention.load_cudnn_frontend()) is not None:
        pytest.skip(error)
    monkeypatch.setattr(dense_attention, "SLIDING", True)
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "cudnn")
    eager, inputs = _check_dense(window, 2048)
    for off_by_one in (window - 1, window + 1) if window == 16 else ():
        assert max(_errors(eager, *inputs, off_by_one)) > 5e-2, off_by_one
