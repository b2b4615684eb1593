"""The gated MLP's Triton kernels (``fast_dora/mlp.py``) run in Triton's interpreter on the CPU, against float64.

The kernels are defined when the module is imported, and ``triton.jit`` chooses the interpreter only when
``TRITON_INTERPRET`` is set by then: so each case runs in a fresh interpreter process. It covers the backward
kernel's tiles (``mlp.BACKWARD_TILES``, ``mlp.DOWN_TILES``): token counts that are not a multiple of the tile's rows, column counts that
are not a multiple of its width, the per-program partial sums and their sum, and down_proj's adapter's part of
h's gradient (``d_xa·A``) added inside the kernel. Speed is the GPU's business
(``bench/gated_act_sweep.py``); ``tests/gpu/test_qdora_cuda.py`` runs the same kernels on CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from trinity_core.train.fast_dora import mlp

    t, n, gelu, tiles, r = json.loads(sys.argv[1])
    if tiles and r:  # with down_proj's adapter part the kernel launches with DOWN_TILES
        mlp.DOWN_TILES = mlp.BackwardTiles(*tiles)
    elif tiles:
        mlp.BACKWARD_TILES = mlp.BackwardTiles(*tiles)
    gen = torch.Generator().manual_seed(t * 1000 + n)
    e, u, dh = (torch.randn(t, n, generator=gen) for _ in range(3))
    g_e, g_u = (torch.rand(n, generator=gen) + 0.5 for _ in range(2))
    d_xa, lora_a = (torch.randn(t, r, generator=gen), torch.randn(r, n, generator=gen) / 8) if r else (None, None)
    h = mlp._launch_forward(e, u, g_e, g_u, gelu)
    de, du = torch.empty_like(e), torch.empty_like(u)
    d_ge, d_gu = mlp._launch_backward(dh, e, u, g_e, g_u, de, du, gelu, d_xa=d_xa, lora_a=lora_a)
    ref_h = mlp._forward_torch(e.double(), u.double(), g_e.double(), g_u.double(), gelu)
    dh64 = dh.double() + (d_xa.double() @ lora_a.double() if r else 0)  # with r: down_proj's adapter's part
    ref = mlp._backward_torch(dh64, e.double(), u.double(), g_e.double(), g_u.double(), gelu)

    def rel(got, want):
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    print(json.dumps({"h": rel(h, ref_h), "de": rel(de, ref[0]), "du": rel(du, ref[1]),
                      "d_ge": rel(d_ge, ref[2]), "d_gu": rel(d_gu, ref[3])}))
""")


@pytest.mark.parametrize("t, n, gelu, tiles, r", [
    (70, 130, True, None, 0),  # the default tiles (mlp.BACKWARD_TILES): one program's rows cover all tokens
    (300, 200, True, (32, 16, 64, 8), 0),  # 10 row blocks, the last one partial; 4 column blocks, the last partial
    (300, 200, False, (64, 8, 256, 4), 0),  # SiLU; 8 steps of 8 rows a program
    # h's gradient plus d_xa·A inside the kernel (GatedActDownInGraph): r padded to the dot's 16, r = 64 (the
    # recipe's), and tiles of 8 rows, which add it in torch before the kernel
    (70, 130, True, None, 5),
    (300, 200, True, (32, 16, 64, 8), 64),
    (300, 200, False, (64, 8, 256, 4), 7),
    (300, 200, True, (64, 32, 64, 4, 1), 64),  # h's gradient as the dot's accumulator (dot_acc)
])
def test_the_kernels_match_float64(t, n, gelu, tiles, r):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHECK, json.dumps([t, n, gelu, tiles, r])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert max(errors.values()) < 1e-5, errors  # fp32 inside; the sums over up to 300 tokens


def test_tiles_must_divide():
    from trinity_core.train.fast_dora import mlp

    with pytest.raises(ValueError, match="block_t"):
        mlp.BackwardTiles(rows=64, block_t=128, block_n=128, warps=4)
    with pytest.raises(ValueError, match="power of two"):
        mlp.BackwardTiles(rows=48, block_t=16, block_n=128, warps=4)
    with pytest.raises(ValueError, match="dot_acc"):
        mlp.BackwardTiles(rows=64, block_t=16, block_n=128, warps=4, dot_acc=2)


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32], ids=["A_bf16", "A_fp32_autocast"])
def test_gated_act_down_in_graph_matches_the_two_nodes(a_dtype):
    """GatedActDownInGraph (on the CPU its torch arithmetic, traced by Dynamo as in a compiled region) gives the
    outputs and gradients of the two nodes it replaces, bit for bit: the activation, then down_proj's ``h Wᵀ`` and ``A(h)``
    under bf16 autocast, also where A is fp32 (Unsloth's adapters: autocast computes A(h) in bf16), A's gradient
    in A's dtype."""
    from trinity_core.train.fast_dora import mlp

    gen = torch.Generator().manual_seed(3)
    t, n, out, r = 24, 40, 12, 8
    e, u = (torch.randn(t, n, generator=gen).bfloat16() for _ in range(2))
    g_e, g_u = (1 + 0.1 * torch.randn(n, generator=gen) for _ in range(2))
    w = torch.randn(out, n, generator=gen).bfloat16()
    a = torch.randn(r, n, generator=gen).to(a_dtype)
    d_base, d_xa = torch.randn(t, out, generator=gen).bfloat16(), torch.randn(t, r, generator=gen).bfloat16()

    def fused(e, u, g_e, g_u, a):
        return mlp.GatedActDownInGraph.apply(e, u, g_e, g_u, True, w, a)

    def two_nodes(e, u, g_e, g_u, a):
        h = mlp.GatedActInGraph.apply(e, u, g_e, g_u, True)
        return torch.nn.functional.linear(h, w), torch.nn.functional.linear(h, a)

    results = []
    for fn in (fused, two_nodes):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        leaves = [x.clone().requires_grad_() for x in (e, u, g_e, g_u, a)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = compiled(*leaves)
        results.append((*outs, *torch.autograd.grad(outs, leaves, (d_base, d_xa))))
    for name, got, want in zip(("result", "xa", "de", "du", "d_ge", "d_gu", "d_a"), *results):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), (name, (got.float() - want.float()).abs().max().item())
