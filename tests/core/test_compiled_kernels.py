"""Gemma-3's norms and attention prepare compiled (trinity_core.train.compiled_kernels): the reference
arithmetic is transformers' own, bit for bit; the compiled functions (``aot_eager`` here: Dynamo's trace and
AOTAutograd's forward/backward split, which inductor then lowers on a GPU) give the same values and
gradients, for any sequence length from one graph; the norm patch and the Unsloth backend's prepare swap."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM, Gemma3RMSNorm, apply_rotary_pos_emb

from trinity_core.train import compiled_kernels
from trinity_core.train.compiled_kernels import find_closure_cell, install_compiled_norms, qkv_heads, rms_norm

BACKEND = "aot_eager"


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    tol = 1e-6 if want.dtype == torch.float32 else 1e-2
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_is_transformers_gemma3_norm(dtype):
    norm = Gemma3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = (3 * torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0))).to(dtype)
    assert torch.equal(rms_norm(x, norm.weight, norm.eps), norm(x))


def _attention_inputs(seq: int, dtype=torch.float32, heads: int = 4, kv_heads: int = 2, dim: int = 16):
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(1, seq, heads * dim, generator=gen).to(dtype)
    k = torch.randn(1, seq, kv_heads * dim, generator=gen).to(dtype)
    v = torch.randn(1, seq, kv_heads * dim, generator=gen).to(dtype)
    angles = torch.arange(seq)[:, None] * torch.linspace(0.01, 1.0, dim // 2)[None]
    emb = torch.cat([angles, angles], -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_norm, k_norm = Gemma3RMSNorm(dim, eps=1e-6), Gemma3RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.normal_(0, 0.5, generator=gen)
        k_norm.weight.normal_(0, 0.5, generator=gen)
    return q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads


def transformers_prepare(q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads):
    """What transformers' ``Gemma3Attention.forward`` does between the projections and the attention kernel."""
    bsz, seq = q.shape[:2]
    q = q_norm(q.view(bsz, seq, heads, -1).transpose(1, 2))
    k = k_norm(k.view(bsz, seq, kv_heads, -1).transpose(1, 2))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q.contiguous(), k.contiguous(), v.view(bsz, seq, kv_heads, -1).transpose(1, 2).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qkv_heads_is_transformers_attention_prepare(dtype):
    q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads = _attention_inputs(9, dtype)
    got = qkv_heads(q, k, v, cos, sin, q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps, heads, kv_heads)
    want = transformers_prepare(q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads)
    for g, w in zip(got, want):
        assert g.is_contiguous() and torch.equal(g, w)


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(7)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs])
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_functions_match_the_reference_at_every_length_from_one_graph(dtype):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled_kernels.compiled.cache_clear()
    kernels = compiled_kernels.compiled(BACKEND)
    before = counters["stats"]["unique_graphs"]
    for seq in (5, 9, 13):
        q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads = _attention_inputs(seq, dtype)

        def prepare(fn):
            return lambda q, k, v, qw, kw: fn(q, k, v, cos, sin, qw, kw, 1e-6, 1e-6, heads, kv_heads)

        inputs = [q, k, v, q_norm.weight, k_norm.weight]
        for name, fn, ref, args in (("qkv_heads", prepare(kernels.qkv_heads), prepare(qkv_heads), inputs),
                                    ("rms_norm", lambda x, w: kernels.rms_norm(x, w, 1e-6),
                                     lambda x, w: rms_norm(x, w, 1e-6), [q.view(-1, q.shape[-1]), torch.randn(64)])):
            (outs, grads), (want_outs, want_grads) = _grads(fn, args), _grads(ref, args)
            for i, (g, w) in enumerate(zip(outs + tuple(grads), want_outs + tuple(want_grads))):
                _close(g, w, f"{name} seq {seq} #{i}")
    # dynamic shapes: the three lengths share each function's graph
    assert counters["stats"]["unique_graphs"] - before == 2
    compiled_kernels.compiled.cache_clear()


def test_python_floats_are_traced_as_constants_not_cpu_tensor_inputs():
    """With ``dynamic=True`` Dynamo passes a Python float (the norm's eps) as a 0-dim float64 CPU tensor, which on
    a GPU took inductor's C++ codegen (the tiny job's first step did not finish on an H200): traced as a constant
    instead, a new value recompiles, and Dynamo's own setting is back as it was after the call, raise or not."""
    graphs: list[list[torch.Tensor]] = []

    def recording(gm, example_inputs):
        graphs.append([t for t in example_inputs if isinstance(t, torch.Tensor) and t.dtype == torch.float64])
        return gm.forward

    torch._dynamo.reset()
    norm = compiled_kernels.floats_as_constants(torch.compile(rms_norm, dynamic=True, backend=recording))
    x, w = torch.randn(6, 64), torch.randn(64)
    setting = torch._dynamo.config.specialize_float
    for eps in (1e-6, 1e-6, 1e-2):
        assert torch.equal(norm(x, w, eps), rms_norm(x, w, eps))
    assert graphs == [[], []], "one graph per eps, no float64 (tensorified float) inputs"
    with pytest.raises(RuntimeError):
        norm(x, torch.randn(3), 1e-6)
    assert torch._dynamo.config.specialize_float == setting
    plain = torch.compile(rms_norm, dynamic=True, backend=recording)  # the trap it avoids, still there
    plain(x, w, 1e-5)
    assert [t.dtype for t in graphs[-1]] == [torch.float64], graphs[-1]


def test_install_compiled_norms_trains_as_the_stock_model():
    config = Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, vocab_size=64)
    torch.manual_seed(0)
    stock = Gemma3ForCausalLM(config)
    patched = Gemma3ForCausalLM(config)
    patched.load_state_dict(stock.state_dict())
    norms = [m for m in patched.modules() if isinstance(m, Gemma3RMSNorm)]
    assert install_compiled_norms(patched, backend=BACKEND) == len(norms) == 2 * 4 + 2 * 2 + 1
    assert install_compiled_norms(patched, backend=BACKEND) == 0, "already patched"
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (stock, patched):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    for (name, a), b in zip(stock.named_parameters(), patched.parameters()):
        _close(b.grad, a.grad, name)


def test_the_backends_prepare_is_unsloths_arithmetic(monkeypatch):
    """``backends.unsloth._compiled_prepare`` takes unsloth_zoo's bf16 ``prepare`` arguments and returns its
    results (q, k, v heads; cos, sin; the mask in q's dtype)."""
    from trinity_core.train.backends import unsloth as backend

    original = compiled_kernels.compiled
    monkeypatch.setattr(compiled_kernels, "compiled", lambda backend="inductor": original(BACKEND))
    q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads = _attention_inputs(6, torch.bfloat16)
    dim = q_norm.weight.shape[0]
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float32)
    got = backend._compiled_prepare(None, q, k, v, (1, 6, heads, dim), (1, 6, kv_heads, dim), (cos, sin), mask,
                                    q_norm, k_norm)
    want = transformers_prepare(q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads)
    for g, w in zip(got[:3], want):
        _close(g, w, "qkv")
    assert got[3] is cos and got[4] is sin and got[5].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cos, sin"):
        backend._compiled_prepare(None, q, k, v, (1, 6, heads, dim), (1, 6, kv_heads, dim), None, None, q_norm, k_norm)


def test_inside_a_compiled_region_the_plain_functions_are_inlined(monkeypatch):
    """Within another compile (``train/compiled_layers``) the backend's prepare and the patched norm trace as
    part of it: no call to the cached compiled functions, no graph break."""
    from torch._dynamo.utils import counters

    from trinity_core.train.backends import unsloth as backend

    q, k, v, cos, sin, q_norm, k_norm, heads, kv_heads = _attention_inputs(6)
    dim = q_norm.weight.shape[0]
    norm = Gemma3RMSNorm(heads * dim)
    install_compiled_norms(norm, backend=BACKEND)

    def region(q, k, v):
        q, k, v, *_ = backend._compiled_prepare(None, norm(q), k, v, (1, 6, heads, dim), (1, 6, kv_heads, dim),
                                                (cos, sin), None, q_norm, k_norm)
        return q.sum() + k.sum() + v.sum()

    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(region, backend=BACKEND)(q, k, v)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(got, region(q, k, v), rtol=1e-5)


def test_find_closure_cell_follows_closures_and_wrappers():
    def make():
        def prepare(x):
            return x + 1

        def inner(x):
            return prepare(x)

        def outer(x):
            return inner(x)

        return outer

    outer = make()

    def wrapper(x):
        return outer(x)

    wrapper.__wrapped__ = outer
    cell = find_closure_cell(wrapper, "prepare")
    assert cell is not None and cell.cell_contents(1) == 2
    cell.cell_contents = lambda x: x + 10
    assert wrapper(1) == 11
    assert find_closure_cell(wrapper, "prepare", depth=1) is None, "two levels down"
    assert find_closure_cell(wrapper, "nothing") is None
