"""GPU-only: the NF4 W·Aᵀ Triton kernel, compiled, against dequantise-then-multiply at the 12B shapes.

Run on the lent GPU: ``PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu/test_nf4_matmul_cuda.py``.
Timing is not tested here: ``bench/norm_refresh.py`` measures it.

Tolerance, as in tests/core/test_nf4_matmul.py: against the kernel's arithmetic mirrored in float64
(tests/nf4_reference.py: each weight its NF4 value times its block's scale, both in the GEMM dtype,
rounded once; A rounded to it), only the fp32 accumulation order differs: ≈ u·√in of the result's
scale, u = 2⁻²⁴, in ≤ 15360 → ~1e-5; we allow 1e-4. The block scales equal bitsandbytes' to the bit
(the kernel's nested product is unfused: with an FMA, 1 fp32 ulp turned into an fp16 ulp of a block's
scale now and then, and one run of 2026-11-28 saw 1.02e-4 here). Against bitsandbytes' exact fp32
dequantisation a 16-bit GEMM is off by the fp16 rounding of the NF4 values, the scales and their
products: 1e-3 (dequantising to bf16 first, the old path, is ~2e-3 off).
"""

from __future__ import annotations

import pytest
import torch

from trinity_core import nf4
from trinity_core.train.fast_dora import linear as qdora
from trinity_core.train.fast_dora import nf4_matmul
from tests.nf4_reference import mirrored_product as _mirrored

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
# (out, in) of the 12B Gemma-3 projections: q, k/v, o, gate/up, down
SHAPES_12B = [(4096, 3840), (2048, 3840), (3840, 4096), (15360, 3840), (3840, 15360)]


def _weight(out_features: int, in_features: int, *, nested: bool, dtype=torch.bfloat16, seed: int = 0):
    """A Params4bit quantised on CUDA by bitsandbytes from a random weight (as Unsloth's checkpoints)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (0.02 * torch.randn(out_features, in_features, device="cuda", generator=gen)).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                             compress_statistics=nested, quant_type="nf4", bnb_quantized=True)


def _exact(weight, a_t: torch.Tensor) -> torch.Tensor:
    w = nf4.dequantize(weight.data, weight.quant_state, torch.float32)  # bitsandbytes' CUDA kernel, in fp32
    return w.double() @ a_t.double()


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("out_features,in_features", SHAPES_12B, ids=[f"{o}x{i}" for o, i in SHAPES_12B])
def test_matches_dequantize_then_multiply_at_12b_shapes(out_features, in_features, dtype):
    weight = _weight(out_features, in_features, nested=True, dtype=dtype, seed=out_features + in_features)
    assert nf4_matmul.why_not([weight], CUDA) is None
    gen = torch.Generator(device="cuda").manual_seed(1)
    a_t = (torch.randn(in_features, 64, device="cuda", generator=gen) / in_features ** 0.5).to(dtype)
    got = nf4_matmul.nf4_times(weight, weight.quant_state, a_t)
    assert got.shape == (out_features, 64) and got.dtype == torch.float32
    err, exact = _relative_error(got, _mirrored(weight, a_t)), _relative_error(got, _exact(weight, a_t))
    assert err < 1e-4, f"{err:.2e}"
    assert exact < (1e-4 if dtype == torch.float32 else 1e-3), f"{exact:.2e}"


@pytest.mark.parametrize("shape", [(4100, 96), (70, 192), (33, 384)], ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "absmax"])
def test_odd_shapes_and_plain_absmax(shape, nested):
    """Row tails, chunks of 32 (width 96) and non-power-of-two r (masked columns)."""
    weight = _weight(*shape, nested=nested, seed=shape[0])
    a_t = torch.randn(shape[1], 24, device="cuda").bfloat16()
    err = _relative_error(nf4_matmul.nf4_times(weight, weight.quant_state, a_t), _mirrored(weight, a_t))
    assert err < 1e-4, f"{err:.2e}"


def test_one_hot_columns_pick_single_weights():
    """fp32 A of one-hot columns picks single weights: bitsandbytes' own fp32 dequantised values."""
    weight = _weight(2048, 3840, nested=True, seed=5)
    picks = torch.randperm(3840, device="cuda")[:64]
    a_t = torch.zeros(3840, 64, device="cuda")
    a_t[picks, torch.arange(64, device="cuda")] = 1
    got = nf4_matmul.nf4_times(weight, weight.quant_state, a_t)
    want = nf4.dequantize(weight.data, weight.quant_state, torch.float32)[:, picks]
    # bit for bit: the kernel rounds code2[q]·absmax2 before adding the offset, as bitsandbytes does (with
    # a fused multiply-add the two differed by up to 2.1e-7 relative on an H200, 2026-11-28)
    assert torch.equal(got, want), f"max relative difference {((got - want).abs() / want.abs()).max().item():.2e}"


def test_stacked_launch_over_distinct_weights():
    weights = [_weight(2048, 3840, nested=True, seed=s) for s in range(3)]
    gen = torch.Generator(device="cuda").manual_seed(2)
    a = torch.randn(3, 64, 3840, device="cuda", generator=gen) / 3840 ** 0.5
    got = nf4_matmul.nf4_times_stacked(weights, a, torch.bfloat16)
    for i, weight in enumerate(weights):
        err = _relative_error(got[i], _mirrored(weight, a[i].mT.half()))  # a 16-bit GEMM converts A to fp16
        assert err < 1e-4, f"layer {i}: {err:.2e}"


def _fast_dora_items(count: int, out_features: int = 4096, in_features: int = 3840) -> list:
    """``count`` fast-DoRA layers over NF4 weights, as the refresh sees them: (dora, A, B, s, base)."""
    import types

    from peft.tuners.lora.dora import DoraLinearLayer

    torch.manual_seed(0)
    items = []
    for seed in range(count):
        weight = _weight(out_features, in_features, nested=True, seed=seed)
        base = types.SimpleNamespace(weight=weight, bias=None)
        a = torch.nn.Parameter(torch.randn(64, in_features, device="cuda") / in_features ** 0.5)
        b = torch.nn.Parameter(torch.randn(out_features, 64, device="cuda") * 0.01)
        dora = DoraLinearLayer(fan_in_fan_out=False)
        dora.__class__ = qdora.FastDoraLinearLayer
        dora.prepare(base)
        dora.weight_norm(a, b, 4.0, base)
        items.append((dora, a, b, 4.0, base))
    return items


def test_refresh_replays_a_cuda_graph_with_the_eager_norms(monkeypatch):
    """Five refreshes of the same projections (two shapes: two stacks), A and B changed in place before
    each as an optimizer step does: the first runs eagerly, the second is captured, the rest replay the
    graph; each time the cached norms equal the eager refresh's for the same A and B, bit for bit. A
    new storage for one A (a reload) makes the next refresh eager again, with that A's norm; the graph
    goes with its optimizer."""
    import gc

    gc.collect()
    others = len(qdora._replays)
    items = _fast_dora_items(2) + _fast_dora_items(2, 2048, 3840)
    optimizer = torch.optim.SGD([p for item in items for p in item[1:3]], lr=0.0)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for step in range(5):
        with torch.no_grad():
            for _, a, b, _, _ in items:
                a.add_(0.01 * torch.randn(a.shape, device="cuda", generator=gen))
                b.add_(0.001 * torch.randn(b.shape, device="cuda", generator=gen))
        monkeypatch.setattr(qdora, "USE_CUDA_GRAPH", False)
        qdora.refresh_after_step(optimizer)
        eager = [item[0]._cached_norm.clone() for item in items]
        monkeypatch.setattr(qdora, "USE_CUDA_GRAPH", True)
        assert qdora.refresh_after_step(optimizer) == 4
        for i, item in enumerate(items):
            assert torch.equal(item[0]._cached_norm, eager[i]), f"step {step}, layer {i}"
        replay = qdora._replays[optimizer]
        assert (replay.graph is None) == (step == 0), f"step {step}: graph {replay.graph}"
    captured = replay
    dora, a = items[0][:2]
    with torch.no_grad():
        a.data = a.data.clone() * 0.5  # new storage
    qdora.refresh_after_step(optimizer)
    assert qdora._replays[optimizer] is not captured and qdora._replays[optimizer].graph is None
    w = nf4.dequantize(items[0][4].weight.data, items[0][4].weight.quant_state, torch.float32)
    ref = qdora.linear_norm_reference(w, a, items[0][2], 4.0)
    assert ((dora._cached_norm.double() - ref).abs() / ref).max().item() < 1e-4
    optimizer = captured = replay = None
    gc.collect()
    assert len(qdora._replays) == others


def test_refresh_with_the_kernel_matches_the_dequantising_path(monkeypatch):
    """The batched refresh over 3 same-shaped bf16 projections: both paths' norms against float64
    norms of bitsandbytes' fp32 weights; the kernel path (fp16 NF4 values, fp32 W·Aᵀ) at least as
    close as the old one (bf16 weights, W·Aᵀ rounded to bf16)."""
    items = _fast_dora_items(3)
    optimizer = torch.optim.SGD([p for item in items for p in item[1:3]], lr=0.0)
    norms = {}
    for use_kernel in (False, True):
        monkeypatch.setattr(qdora, "USE_NF4_KERNEL", use_kernel)
        assert qdora.refresh_after_step(optimizer) == 3
        norms[use_kernel] = [item[0]._cached_norm.clone() for item in items]
    for (dora, a, b, s, base), old, new in zip(items, norms[False], norms[True]):
        w = nf4.dequantize(base.weight.data, base.weight.quant_state, torch.float32)
        ref = qdora.linear_norm_reference(w, a, b, s)
        err_new = ((new.double() - ref).abs() / ref).max().item()
        err_old = ((old.double() - ref).abs() / ref).max().item()
        assert err_new < 1e-4, f"kernel path {err_new:.2e} (old path {err_old:.2e})"
        assert err_new <= err_old * 1.5 + 1e-6, f"kernel path {err_new:.2e} vs old path {err_old:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("out_features,in_features", SHAPES_12B, ids=[f"{o}x{i}" for o, i in SHAPES_12B])
def test_fused_row_norms_at_12b_shapes(out_features, in_features, dtype):
    """The fused norms compiled (B·AAᵀ·Bᵀ a tf32x3 dot in its own kernel, A·Aᵀ in A's pass, the cross
    term in the NF4 kernel's epilogue) for a stack of two weights at each 12B shape,
    B in bf16 and r 64 as trained: the squared norms against float64 from bitsandbytes' fp32
    dequantisation, within the 16-bit GEMM's 1e-3 of W Aᵀ (the cross term) for bf16, 1e-4 for fp32."""
    weights = [_weight(out_features, in_features, nested=True, seed=s) for s in range(2)]
    gen = torch.Generator(device="cuda").manual_seed(7)
    a = torch.randn(2, 64, in_features, device="cuda", generator=gen) / in_features ** 0.5
    b = (0.02 * torch.randn(2, out_features, 64, device="cuda", generator=gen)).to(torch.bfloat16)
    dense = [nf4.dequantize(w.data, w.quant_state, torch.float32).double() for w in weights]
    w2 = torch.stack([(d * d).sum(1) for d in dense]).float()
    s = torch.tensor([32 / 8, 0.5], device="cuda")
    n2, size = nf4_matmul.nf4_row_norms_or_none(weights, a, b, w2, s, dtype)
    tol = 1e-3 if dtype != torch.float32 else 1e-4
    for i, d in enumerate(dense):
        delta = b[i].double() @ a[i].double()
        direct = ((d + s[i].double() * delta) ** 2).sum(1)
        assert ((n2[i].double() - direct).abs() / direct).max().item() < tol
        want_size = w2[i].double() + s[i].double() ** 2 * (delta * delta).sum(1)
        assert ((size[i].double() - want_size).abs() / want_size).max().item() < 1e-4


@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "absmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("out_features,in_features", SHAPES_12B + [(9, 7)],
                         ids=[f"{o}x{i}" for o, i in SHAPES_12B + [(9, 7)]])
def test_dequantisation_kernel_is_bitsandbytes_at_12b_shapes(out_features, in_features, dtype, nested):
    """``trinity::nf4_dequantize`` (what the compiled decoder layers launch for a frozen projection), compiled:
    bitsandbytes' CUDA dequantisation to the bit, eagerly and inside torch.compile (inductor launches the kernel)."""
    from trinity_core.train import nf4_dequant

    weight = _weight(out_features, in_features, nested=nested, dtype=dtype, seed=out_features)
    want = nf4.dequantize(weight.data, weight.quant_state, dtype)
    assert torch.equal(nf4_dequant.dequantize(weight, dtype), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda w: nf4_dequant.dequantize(w, dtype), dynamic=True)
    assert torch.equal(compiled(weight), want)


@pytest.mark.parametrize("out_features,in_features", [(15360, 3840), (9, 7)], ids=["15360x3840", "9x7"])
def test_dequantisation_with_a_tail_compiled(out_features, in_features):
    """``dequantize(w, dtype, tail)`` (fast_dora/lora_in_gemm's ``[W | s·B]``) inside torch.compile: W's columns
    bitsandbytes' values to the bit, the tail copied; and the adapter's GEMM through it (LoraInGemm) against the
    base GEMM plus the LoRA GEMM, compiled, forward and backward."""
    from trinity_core.train import nf4_dequant
    from trinity_core.train.fast_dora.lora_in_gemm import LoraInGemm

    dtype = torch.bfloat16
    weight = _weight(out_features, in_features, nested=True, dtype=dtype, seed=3)
    want = nf4.dequantize(weight.data, weight.quant_state, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    b = torch.randn(out_features, 64, device="cuda", generator=gen) * 0.01
    tail = (b * 0.5).to(dtype)
    torch._dynamo.reset()
    got = torch.compile(lambda w, t: nf4_dequant.dequantize(w, dtype, t))(weight, tail)
    assert torch.equal(got[:, :in_features], want) and torch.equal(got[:, in_features:], tail)

    x = torch.randn(300, in_features, device="cuda", generator=gen).to(dtype).requires_grad_()
    xa = (torch.randn(300, 64, device="cuda", generator=gen) * 0.1).to(dtype).requires_grad_()
    b.requires_grad_()

    def fused(x, xa, b):
        return LoraInGemm.apply(x, xa, nf4_dequant.dequantize(weight, dtype, (b.detach() * 0.5).to(dtype)), b, 0.5)

    def two_gemms(x, xa, b):
        return x.double() @ want.double().t() + 0.5 * xa.double() @ b.double().t()

    dz = torch.randn(300, out_features, device="cuda", generator=gen).to(dtype)
    z = torch.compile(fused)(x, xa, b)
    grads = torch.autograd.grad(z, (x, xa, b), dz)
    z64 = two_gemms(x, xa, b)
    want_grads = torch.autograd.grad(z64, (x, xa, b), dz.double())
    assert ((z.double() - z64).abs().max() / z64.abs().max()).item() < 1e-2  # bf16 output
    for got_grad, want_grad in zip(grads, want_grads):
        assert ((got_grad.double() - want_grad).abs().max() / want_grad.abs().max()).item() < 1e-2
