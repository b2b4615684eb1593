"""What a compiled region (trinity_core.train.compiled_layers) computes in place of fast DoRA's Triton launches,
which Dynamo cannot trace: by default the gated MLP's kernels as the triton ops ``trinity::gated_act_kernel`` and
its backward (``mlp.GatedActInGraph``; their torch fallbacks on the CPU), DoraOutput's arithmetic in torch operations
(``linear.scale_and_reduce``'s traced branch) for inductor to fuse; with ``mlp.REGION_KERNELS`` off the gated
activation's arithmetic in torch operations too; with ``linear.REGION_CUSTOM_OPS`` (the A/B) the
custom ops ``trinity::scale_and_reduce`` (DoraOutput's backward) and ``trinity::gated_act`` with its backward
``trinity::gated_act_backward`` (the gated MLP). Here on the CPU: torch.library.opcheck of the ops (schema, fake
tensors, autograd registration, AOTAutograd with dynamic shapes), both against float64 autograd, and what a traced
caller gets; tests/gpu/test_qdora_cuda.py runs the Triton ones against GatedDoraAct."""

from __future__ import annotations

import pytest
import torch

from trinity_core.train.fast_dora import linear as qdora
from trinity_core.train.fast_dora import mlp


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(shape, generator=gen).to(dtype)
    u = torch.randn(shape, generator=gen).to(dtype)
    g_e = 1 + 0.1 * torch.randn(shape[-1], generator=gen)
    g_u = 1 + 0.1 * torch.randn(shape[-1], generator=gen)
    dh = torch.randn(shape, generator=gen).to(dtype)
    return e, u, g_e, g_u, dh


@pytest.mark.parametrize("gelu", [True, False], ids=["gelu_tanh", "silu"])
def test_gated_act_op_passes_opcheck(gelu):
    e, u, g_e, g_u, _ = _inputs((37, 24), torch.float32)
    for t in (e, u, g_e, g_u):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.trinity.gated_act.default, (e, u, g_e, g_u, gelu))
    torch.library.opcheck(torch.ops.trinity.gated_act_backward.default,
                          (torch.randn(37, 24), e.detach(), u.detach(), g_e.detach(), g_u.detach(), gelu))
    torch.library.opcheck(torch.ops.trinity.gated_act_kernel.default, (e.detach(), u.detach(), g_e.detach(),
                                                                      g_u.detach(), gelu))
    torch.library.opcheck(torch.ops.trinity.gated_act_kernel_backward.default,
                          (torch.randn(37, 24), e.detach(), u.detach(), g_e.detach(), g_u.detach(), gelu))


def test_scale_and_reduce_op_passes_opcheck():
    dy, z = torch.randn(29, 40), torch.randn(29, 40)
    torch.library.opcheck(torch.ops.trinity.scale_and_reduce.default, (dy, z, 1 + 0.1 * torch.randn(40)))
    dz, dyz = torch.ops.trinity.scale_and_reduce(dy, z, torch.full((40,), 2.0))
    assert torch.equal(dz, dy * 2) and torch.allclose(dyz, (dy * z).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["op", "in_graph", "in_graph_torch"])
@pytest.mark.parametrize("act", [torch.nn.GELU(approximate="tanh"), torch.nn.SiLU()], ids=["gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_act_matches_float64_autograd(act, dtype, impl, monkeypatch):
    """h and its four gradients from the custom op, GatedActInGraph through the triton ops, or GatedActInGraph's
    torch arithmetic (REGION_KERNELS off) against the activation module's formula through float64 autograd: within
    the dtype's rounding of the result's scale (the gain gradients: fp32 sums over tokens)."""
    monkeypatch.setattr(mlp, "REGION_KERNELS", impl != "in_graph_torch")
    e, u, g_e, g_u, dh = _inputs((3, 41, 24), dtype)
    leaves = [t.clone().requires_grad_() for t in (e, u, g_e, g_u)]
    gelu = isinstance(act, torch.nn.GELU)
    if impl == "op":
        h = mlp._gated_act_op(leaves[0].reshape(-1, 24), leaves[1].reshape(-1, 24), leaves[2], leaves[3],
                              gelu).view(e.shape)
    else:
        h = mlp.GatedActInGraph.apply(*leaves, gelu)
    assert h.dtype == dtype
    grads = torch.autograd.grad(h, leaves, dh)
    ref_leaves = [t.detach().double().requires_grad_() for t in (e, u, g_e, g_u)]
    ref = act(ref_leaves[0] * ref_leaves[2]) * (ref_leaves[1] * ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dh.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((h.double() - ref).abs().max() / ref.abs().max()).item() < tol
    for name, got, want in zip(("e", "u", "g_e", "g_u"), grads, ref_grads):
        assert got.dtype == (dtype if name in ("e", "u") else torch.float32), name
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < tol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("custom_ops", [False, True], ids=["traced", "custom_ops"])
def test_compiled_callers(custom_ops, monkeypatch):
    """Inside a traced function gated_act and scale_and_reduce trace their arithmetic (no custom op in the graph)
    or, with REGION_CUSTOM_OPS, call the ops (one node each); no graph break either way, and what the eager
    callers give."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from transformers.activations import ACT2FN

    monkeypatch.setattr(qdora, "REGION_CUSTOM_OPS", custom_ops)
    torch._dynamo.reset()

    e, u, g_e, g_u, dh = _inputs((2, 9, 16), torch.float32, seed=1)
    z = torch.randn(18, 16)

    def both(e, u, g_e, g_u, dh, z):
        h = mlp.gated_act(e, u, g_e, g_u, ACT2FN["gelu_pytorch_tanh"])  # Gemma-3's
        dz, dyz = qdora.scale_and_reduce(dh.reshape(-1, 16), z, g_e)
        return h, dz, dyz

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(both, backend=counter, fullgraph=True)
    got, want = compiled(e, u, g_e, g_u, dh, z), both(e, u, g_e, g_u, dh, z)
    assert counter.frame_count == 1
    targets = {str(n.target).removesuffix(".default") for g in counter.graphs for n in g.graph.nodes
               if n.op == "call_function"}
    ops = {"trinity.gated_act", "trinity.scale_and_reduce"}
    assert ops <= targets if custom_ops else not ops & targets, targets
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
