"""The NF4 W·Aᵀ kernel (Triton) against dequantise-then-multiply, in Triton's interpreter on CPU.

The kernel runs on CUDA in training; here ``TRITON_INTERPRET=1`` runs the same kernel source on CPU
tensors (numpy), so the index arithmetic, nibble order, absmax (plain and double-quantised),
masking of partial tiles and the stacked launch are checked without a GPU
(tests/gpu/test_nf4_matmul_cuda.py repeats the comparison compiled, at the 12B shapes).

Tolerance: ``_mirrored`` multiplies the same NF4 values (fp16 table for 16-bit GEMMs, fp32 for
fp32), absmax and A (in the GEMM dtype) in float64, so only the kernel's fp32 accumulation order
differs: ≈ u·√in relative to the result's scale (u = 2⁻²⁴, in ≤ 512 → ~1e-6); we allow 1e-5.
Against bitsandbytes' exact fp32 dequantisation a 16-bit GEMM is off by the fp16 rounding of the
16 NF4 values (≤ 2⁻¹² relative each, the same for every weight with that code, so it does not
average out): we allow 1e-3 (seen: ~2e-4; dequantising to bf16 first, today's path, is ~2e-3 off).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="Triton is not installed (the NF4 kernel's tests need its interpreter)")

from trinity_core import nf4  # noqa: E402
from trinity_core.train.fast_dora import enable_fast_dora  # noqa: E402
from trinity_core.train.fast_dora import linear as qdora  # noqa: E402
from trinity_core.train.fast_dora import nf4_matmul  # noqa: E402
from trinity_core.train.fast_dora.linear import linear_norm_reference  # noqa: E402
from tests.nf4_reference import mirrored_product as _mirrored  # noqa: E402

TOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Run kernels in Triton's interpreter, with bitsandbytes' CPU kernel reading the stream flat."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nf4.read_rows_flat_on_cpu()


def _nf4_weight(out_features: int, in_features: int, *, nested: bool, seed: int = 0, quant_type: str = "nf4"):
    """A bitsandbytes Params4bit quantised on CPU from a random weight."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, requires_grad=False,
                                     compress_statistics=nested, quant_type=quant_type)
    return layer.to("cpu").weight  # quantises


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _exact(weight, a_t: torch.Tensor) -> torch.Tensor:
    """W·a_t in float64 with bitsandbytes' fp32 dequantisation and A as given."""
    return nf4.dequantize(weight.data, weight.quant_state, torch.float32).double() @ a_t.double()


# (out, in): rows not a multiple of the 64-row tile (or of the 128-row one, from 1024 rows up),
# widths in chunks of 32 (96, 160: not multiples of 64) or 64 (none of them multiples of 128 but 512)
SHAPES = [(70, 192), (130, 96), (33, 384), (20, 512), (9, 160), (1030, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "absmax"])
@pytest.mark.parametrize("out_features,in_features", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_matches_dequantize_then_multiply(out_features, in_features, nested, dtype):
    weight = _nf4_weight(out_features, in_features, nested=nested, seed=out_features + in_features)
    assert nf4_matmul.why_not([weight], CPU) is None
    a_t = torch.randn(in_features, 24).to(dtype)  # r = 24: not a power of two, columns masked
    got = nf4_matmul.nf4_times(weight, weight.quant_state, a_t)
    assert got.shape == (out_features, 24) and got.dtype == torch.float32
    assert _relative_error(got, _mirrored(weight, a_t)) < TOL
    assert _relative_error(got, _exact(weight, a_t)) < (TOL if dtype == torch.float32 else 1e-3)


def test_one_hot_columns_pick_single_weights():
    """With A = one-hot columns W·A picks single weights: each is its NF4 value times its block's
    absmax (fp32 GEMM: bitsandbytes' dequantised value), at the right row and column."""
    weight = _nf4_weight(40, 128, nested=True, seed=3)
    picks = torch.tensor([0, 1, 2, 63, 64, 65, 126, 127, 5, 17, 33, 99, 100, 101, 110, 111])
    a_t = torch.zeros(128, 16)
    a_t[picks, torch.arange(16)] = 1
    got = nf4_matmul.nf4_times(weight, weight.quant_state, a_t)
    want = nf4.dequantize(weight.data, weight.quant_state, torch.float32)[:, picks]
    assert torch.equal(got, want)


def test_stacked_launch_matches_each_weight():
    """One launch over three different weights (the refresh's stack) with different A per weight."""
    weights = [_nf4_weight(70, 192, nested=True, seed=s) for s in range(3)]
    a = torch.randn(3, 64, 192)
    got = nf4_matmul.nf4_times_stacked(weights, a, torch.float32)
    assert got.shape == (3, 70, 64)
    for i, weight in enumerate(weights):
        assert _relative_error(got[i], _mirrored(weight, a[i].mT)) < TOL


@pytest.mark.parametrize("r", [8, 20], ids=["r8", "r20_padded"])
def test_fused_row_norms_match_float64(r):
    """The fused norms (A's pass, the W-free kernel, the NF4 kernel's epilogue):
    ``n2 = ‖W_i‖² + 2s·B_i(W Aᵀ)_i + s²·B_i A Aᵀ B_iᵀ`` and its scale
    for a stack of three weights (70 rows: a partial tile; r = 20: padded to 32 columns), B in bf16
    as TRL keeps it, against the same sum in float64 from the dequantised weights."""
    weights = [_nf4_weight(70, 192, nested=True, seed=s) for s in range(3)]
    torch.manual_seed(3)
    a = torch.randn(3, r, 192) / 192 ** 0.5
    b = (torch.randn(3, 70, r) * 0.05).to(torch.bfloat16)
    dense = [nf4.dequantize(w.data, w.quant_state, torch.float32).double() for w in weights]
    w2 = torch.stack([(d * d).sum(1) for d in dense]).float()
    s = torch.tensor([0.5, 2.0, 7.0])
    n2, size = nf4_matmul.nf4_row_norms_or_none(weights, a, b, w2, s, torch.float32)
    for i, d in enumerate(dense):
        direct = ((d + s[i].double() * (b[i].double() @ a[i].double())) ** 2).sum(1)
        quad = ((b[i].double() @ a[i].double()) ** 2).sum(1)
        torch.testing.assert_close(n2[i].double(), direct, rtol=1e-5, atol=0)
        torch.testing.assert_close(size[i].double(), w2[i].double() + s[i].double() ** 2 * quad, rtol=1e-5, atol=0)


def test_says_why_it_cannot_take_a_weight():
    fp4 = _nf4_weight(16, 128, nested=False, quant_type="fp4")
    assert "nf4" in nf4_matmul.why_not([fp4], CPU)
    odd_width = _nf4_weight(16, 200, nested=False)  # 200 = 8 · 25: no chunk of 32 divides it
    assert "in_features 200" in nf4_matmul.why_not([odd_width], CPU)
    plain = nn.Parameter(torch.randn(16, 128))
    assert "Params4bit" in nf4_matmul.why_not([plain], CPU)
    mixed = [_nf4_weight(16, 128, nested=True), _nf4_weight(16, 128, nested=False)]
    assert "differ" in nf4_matmul.why_not(mixed, CPU)
    ok = _nf4_weight(16, 128, nested=True)
    with pytest.raises(nf4_matmul.UnsupportedNf4Weight, match="a_t has shape"):
        nf4_matmul.nf4_times(ok, ok.quant_state, torch.randn(64, 8))
    with pytest.raises(nf4_matmul.UnsupportedNf4Weight, match="nf4"):
        nf4_matmul.nf4_times(fp4, fp4.quant_state, torch.randn(128, 8))
    with pytest.raises(nf4_matmul.UnsupportedNf4Weight, match="GEMM dtype"):
        nf4_matmul.nf4_times_stacked([ok], torch.randn(1, 8, 128), torch.float64)
    with pytest.raises(nf4_matmul.UnsupportedNf4Weight, match="r = 256"):
        nf4_matmul.nf4_times_stacked([ok], torch.randn(1, 256, 128), torch.float32)
    assert nf4_matmul.nf4_times_stacked_or_none([ok], torch.randn(1, 256, 128), torch.float32) is None


def test_cpu_without_the_interpreter_keeps_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    weight = _nf4_weight(16, 128, nested=True)
    assert "CUDA" in nf4_matmul.why_not([weight], CPU)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96, bias=False)  # in 64: chunks of 64
        self.down = nn.Linear(96, 64, bias=False)  # in 96: chunks of 32

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _quantized_block(seed: int) -> _Block:
    import bitsandbytes as bnb

    block = _Block()
    for name in ("up", "down"):
        lin = getattr(block, name)
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="nf4")
        layer.weight = _nf4_weight(lin.out_features, lin.in_features, nested=True, seed=seed * 10 + len(name))
        setattr(block, name, layer)
    return block


def _refreshed_norms(use_kernel: bool, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(norms after one optimizer step's batched refresh, their float64 references) for 3 blocks."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(qdora, "USE_NF4_KERNEL", use_kernel)
    torch.manual_seed(0)
    model = nn.Sequential(*[_quantized_block(seed) for seed in range(3)])
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=True,
                                             target_modules=["up", "down"]))
    assert enable_fast_dora(model) == 6
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    model(torch.randn(2, 64)).pow(2).mean().backward()
    opt.step()  # the post-step hook refreshes all six norms
    norms, refs = [], []
    for module in model.modules():
        if not isinstance(getattr(module, "lora_magnitude_vector", None), nn.ModuleDict):
            continue
        dora = module.lora_magnitude_vector["default"]
        a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        assert dora._cache_key == qdora._cache_key(a, b, s)
        w = module.get_base_layer().weight
        norms.append(dora._cached_norm.clone())
        refs.append(linear_norm_reference(nf4.dequantize(w.data, w.quant_state, torch.float32), a, b, s))
    return norms, refs


def test_refresh_with_the_kernel_gives_the_same_norms(monkeypatch):
    """The optimizer step's batched refresh through the kernel (interpreted) equals today's
    dequantise-and-multiply path and the float64 norm of each layer; the kernel really ran."""
    launches = []
    launch = nf4_matmul.nf4_row_norms_or_none

    def counted(weights, *args):
        out = launch(weights, *args)
        if out is not None:
            launches.append(len(weights))
        return out

    monkeypatch.setattr(nf4_matmul, "nf4_row_norms_or_none", counted)
    with_kernel, refs = _refreshed_norms(True, monkeypatch)
    assert sorted(launches)[-2:] == [3, 3]  # the step's refresh: one launch per stack of 3 same-shaped projections
    launches.clear()
    without, refs_again = _refreshed_norms(False, monkeypatch)
    assert launches == []
    for got, old, ref, ref2 in zip(with_kernel, without, refs, refs_again):
        # same model and data both times; the step's gradients saw the lazily computed norms of
        # either path, so A and B after the step differ by fp32 rounding only
        torch.testing.assert_close(ref, ref2, rtol=1e-7, atol=0)
        torch.testing.assert_close(got, old, rtol=2e-6, atol=0)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(old.double(), ref2, rtol=1e-5, atol=0)


def test_refresh_recomputes_rows_the_kernel_left_non_finite(monkeypatch):
    """A row of W·Aᵀ that came back infinite (as fp16 products would overflow for A beyond 65504)
    is recomputed from the dequantised weights: every norm stays finite and right."""
    launch = nf4_matmul.nf4_row_norms_or_none

    def overflowed(*args):
        n2, size = launch(*args)
        n2[:, 3] = float("inf")
        return n2, size

    monkeypatch.setattr(nf4_matmul, "nf4_row_norms_or_none", overflowed)
    norms, refs = _refreshed_norms(True, monkeypatch)
    for got, ref in zip(norms, refs):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


def test_cuda_and_cuda_0_are_one_device(monkeypatch):
    """``torch.device("cuda") != torch.device("cuda:0")``; the kernel's device check must not refuse
    weights on cuda:0 for A made with ``device="cuda"`` (the H200 run of 2026-11-28 did, 16 tests)."""
    import torch

    from trinity_core.train.fast_dora import nf4_matmul as nm

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert nm._same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert nm._same_device("cuda:1", "cuda:1") and not nm._same_device("cuda:0", "cuda:1")
    assert not nm._same_device(torch.device("cuda"), torch.device("cuda:1"))
    assert not nm._same_device("cpu", "cuda:0") and nm._same_device("cpu", "cpu")
