"""Fast DoRA against PEFT's own DoRA: same outputs, same gradients, fresh norms after every step.

Tolerance: everything runs in fp32. The factored norm sums the same products in another order
(‖W_i‖² + 2s·B_i·(WAᵀ)_i + s²·B_iAAᵀB_iᵀ instead of ‖W_i + s·B_iA‖²), so the two agree to fp32
reassociation error, ≈ u·√in relative (u = 2⁻²⁴ ≈ 6e-8, in ≤ 512 here → ~1e-6); we allow 2e-5
relative on outputs and gradients, and compare the norm itself with a float64 reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trinity_core import nf4
from trinity_core.train.fast_dora import cast_input
from trinity_core.train.fast_dora import linear as qdora
from trinity_core.train.fast_dora import enable_fast_dora
from trinity_core.train.fast_dora.linear import FastDoraLinearLayer, linear_norm_reference
from trinity_core.train.fast_dora.linear import plain_fast_dora

RTOL = 2e-5
TINY_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _flat_4bit_kernel():
    """The 4-bit layers here are built directly, not through the CPU backend that does this."""
    nf4.read_rows_flat_on_cpu()


class Block(nn.Module):
    """Two projections, like an attention/MLP pair, so shapes differ within one model."""

    def __init__(self, d_in: int, d_mid: int, d_out: int, bias: bool):
        super().__init__()
        self.up = nn.Linear(d_in, d_mid, bias=bias)
        self.down = nn.Linear(d_mid, d_out, bias=bias)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _quantize(block: Block) -> Block:
    import bitsandbytes as bnb

    for name in ("up", "down"):
        lin = getattr(block, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(block, name, q.to("cpu"))
    return block


def _pair(d_in, d_mid, d_out, *, four_bit, bias=False, r=8, dropout=0.0, seed=0):
    """(PEFT DoRA model, the same model with fast DoRA), B random so the norms are non-trivial."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    block = Block(d_in, d_mid, d_out, bias)
    if four_bit:
        block = _quantize(block)
    config = LoraConfig(r=r, lora_alpha=16, use_rslora=True, use_dora=True, lora_dropout=dropout,
                        target_modules=["up", "down"])
    ref = get_peft_model(block, config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    # the magnitude vector was initialised from B = 0; re-initialise it from the current B, as
    # after some training, so the DoRA factor m/‖W+sBA‖ is not exactly 1
    for m in ref.modules():
        if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
            dora = m.lora_magnitude_vector["default"]
            with torch.no_grad():
                dora.weight.copy_(linear_norm_reference(_dense(m.get_base_layer()), m.lora_A["default"].weight,
                                                        m.lora_B["default"].weight, m.scaling["default"])
                                  .float() * (1 + 0.1 * torch.randn_like(dora.weight)))
    fast = copy.deepcopy(ref)
    assert enable_fast_dora(fast) == 2
    return ref, fast


def _dense(base) -> torch.Tensor:
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(base).float()


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(actual, expected, what, rtol=RTOL):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max |Δ| / max |ref| = {err:.2e} > {rtol}"


def _train_side_by_side(ref, fast, d_in, *, steps=3, accum=3, seed=1, lr=0.05):
    """Step both models with their own SGD and gradient accumulation; compare at every micro-batch."""
    opt_ref = torch.optim.SGD(_trainable(ref).values(), lr=lr)
    opt_fast = torch.optim.SGD(_trainable(fast).values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for _ in range(accum):
            x = torch.randn(4, 5, d_in, generator=gen)
            torch.manual_seed(step)  # same dropout masks on both sides
            y_ref = ref(x)
            torch.manual_seed(step)
            y_fast = fast(x)
            _assert_close(y_fast, y_ref, f"output, step {step}")
            target = torch.randn(y_ref.shape, generator=gen)
            ((y_ref - target) ** 2).mean().div(accum).backward()
            ((y_fast - target) ** 2).mean().div(accum).backward()
        grads_ref = {n: p.grad for n, p in _trainable(ref).items()}
        for name, p in _trainable(fast).items():
            _assert_close(p.grad, grads_ref[name], f"grad {name}, step {step}")
        assert any("lora_magnitude_vector" in n for n in grads_ref)
        opt_ref.step()
        opt_fast.step()
        opt_ref.zero_grad()
        opt_fast.zero_grad()


SHAPES = [(64, 96, 32), (256, 512, 128), (96, 160, 96)]  # in 96: rows cut on 2-row block boundaries


@pytest.mark.parametrize("four_bit", [False, True], ids=["linear", "nf4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_peft_dora_over_steps_with_accumulation(shape, four_bit):
    ref, fast = _pair(*shape, four_bit=four_bit)
    _train_side_by_side(ref, fast, shape[0])


def test_matches_with_bias_and_dropout():
    ref, fast = _pair(64, 96, 32, four_bit=True, bias=True, dropout=0.1)
    _train_side_by_side(ref, fast, 64)


def _fast_layers(model):
    return [(m, m.lora_magnitude_vector["default"]) for m in model.modules()
            if isinstance(getattr(m, "lora_magnitude_vector", None), nn.ModuleDict)
            and isinstance(m.lora_magnitude_vector["default"], FastDoraLinearLayer)]


def test_norm_is_computed_once_per_optimizer_step_and_never_stale(monkeypatch):
    ref, fast = _pair(64, 96, 32, four_bit=True)
    calls = []  # one entry per layer whose norm is computed (lazily or in a batched refresh)
    original = qdora._stacked_norms
    monkeypatch.setattr(qdora, "_stacked_norms",
                        lambda group, dtype: calls.extend(id(item[0]) for item in group) or original(group, dtype))
    opt = torch.optim.AdamW(_trainable(fast).values(), lr=1e-2)
    for step in range(3):
        for _ in range(4):  # micro-batches
            fast(torch.randn(2, 64)).pow(2).mean().backward()
        # two layers, one refresh each in this optimizer step: lazily in the first forward, then
        # eagerly inside each opt.step() (refresh_after_step), so no forward recomputes them
        assert len(calls) == 2
        for module, dora in _fast_layers(fast):  # ...of the A and B this step trains (not stale)
            expected = linear_norm_reference(_dense(module.get_base_layer()), module.lora_A["default"].weight,
                                             module.lora_B["default"].weight, module.scaling["default"])
            torch.testing.assert_close(dora._cached_norm.double(), expected, rtol=1e-5, atol=0)
        calls.clear()
        opt.step()
        assert len(calls) == 2, "refreshed by the optimizer step"
        opt.zero_grad()


@pytest.mark.parametrize("stack", [1 << 24, 1], ids=["one_stack", "one_layer_per_stack"])
def test_batched_refresh_matches_each_layer(monkeypatch, stack):
    """Same-shaped projections of several blocks are refreshed as stacks (split when
    STACK_ELEMENTS is reached): every norm equals the float64 reference of its own layer."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(qdora, "STACK_ELEMENTS", stack)
    torch.manual_seed(0)
    model = nn.Sequential(*[_quantize(Block(64, 96, 64, False)) for _ in range(3)])
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=True,
                                             target_modules=["up", "down"]))
    assert enable_fast_dora(model) == 6
    opt = torch.optim.SGD(_trainable(model).values(), lr=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model(torch.randn(2, 64)).pow(2).mean().backward()  # registers all six lazily
    opt.step()
    assert qdora.refresh_after_step(opt) == 6
    for module, dora in _fast_layers(model):
        a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        assert dora._cache_key == qdora._cache_key(a, b, s)
        expected = linear_norm_reference(_dense(module.get_base_layer()), a, b, s)
        torch.testing.assert_close(dora._cached_norm.double(), expected, rtol=1e-5, atol=0)


def test_in_place_edit_without_optimizer_refreshes_the_norm():
    _, fast = _pair(64, 96, 32, four_bit=False)
    module, dora = _fast_layers(fast)[0]
    fast(torch.randn(1, 64))
    before = dora._cached_norm.clone()
    with torch.no_grad():
        module.lora_B["default"].weight.mul_(3.0)
    fast(torch.randn(1, 64))
    assert not torch.allclose(before, dora._cached_norm)
    expected = linear_norm_reference(module.get_base_layer().weight, module.lora_A["default"].weight,
                                     module.lora_B["default"].weight, module.scaling["default"])
    torch.testing.assert_close(dora._cached_norm.double(), expected, rtol=1e-5, atol=0)


def test_refresh_after_step_fixes_cancelled_rows_and_skips_other_optimizers():
    _, fast = _pair(256, 64, 32, four_bit=True, r=16)
    module, dora = _fast_layers(fast)[0]
    fast(torch.randn(1, 256))  # registers both layers
    a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
    w = _dense(module.get_base_layer())
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with torch.no_grad():
        a[:1] = w[:1]
        b[:1] = 0
        b[0, 0] = -(1 - 1e-3) / s  # row 0 cancelled to 1e-3 of its norm
    assert qdora.refresh_after_step(other) == 0  # holds none of fast's parameters
    opt = torch.optim.SGD(_trainable(fast).values(), lr=0.0)  # a step that changes nothing
    before = qdora.optimizer_steps()
    opt.step()
    assert qdora.optimizer_steps() == before + 1
    assert dora._cache_key == qdora._cache_key(a, b, s)  # refreshed by the step: the forward reuses it
    expected = linear_norm_reference(w, a, b, s)
    assert abs(dora._cached_norm[0].double() - expected[0]) <= 1e-6 * w[0].norm()
    torch.testing.assert_close(dora._cached_norm.double()[1:], expected[1:], rtol=1e-5, atol=0)


# (in_features, out_features): widths that are and are not multiples of 64 and 256, and the 12B
# Gemma-3 projections (hidden 3840 → q 4096 / kv 2048 / MLP 15360 and back).
WIDTHS = [(96, 12), (160, 7), (192, 9), (200, 24), (320, 11), (3840, 4096), (3840, 2048), (3840, 15360),
          (4096, 3840), (15360, 3840)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("in_features,out_features", WIDTHS, ids=[f"{i}to{o}" for i, o in WIDTHS])
def test_rows_are_dequantised_in_blocks_exactly(monkeypatch, in_features, out_features, double_quant):
    """Block-wise rows equal bitsandbytes' reference dequantisation (its pure-torch backend, which
    reads the packed stream flat like the CUDA kernel) for any width, with and without double quant."""
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    torch.manual_seed(in_features + out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4")
    layer = layer.to("cpu")  # quantises
    state = layer.weight.quant_state
    expected = _dequantize_4bit_compute(layer.weight.data.view(torch.uint8).reshape(-1), nf4.absmax_of(state),
                                        _get_4bit_code("nf4", "cpu"), state.blocksize, list(state.shape),
                                        torch.float32)
    monkeypatch.setattr(qdora, "CHUNK_ELEMENTS", max(in_features * 5, out_features * in_features // 3))
    pieces = list(qdora._weight_rows(layer))
    assert len(pieces) > 1 and [start for start, _ in pieces] == sorted({start for start, _ in pieces})
    assert torch.equal(torch.cat([rows for _, rows in pieces]), expected)
    assert torch.equal(nf4.dequantize(layer.weight.data, state, torch.float32), expected)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("in_features,out_features", [(96, 12), (192, 9), (320, 11), (3840, 64)],
                         ids=["96to12", "192to9", "320to11", "3840to64"])
def test_columns_are_dequantised_in_blocks_exactly(in_features, out_features, double_quant):
    """``nf4.column_blocks`` (the cast path's input gradient, fast_dora/cast_input.py): blocks of whole
    quantisation blocks of every row, each element equal to the whole weight's; a width that is not a
    multiple of the 64-value block comes whole, once."""
    import bitsandbytes as bnb

    torch.manual_seed(in_features + out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4")
    layer = layer.to("cpu")
    state = layer.weight.quant_state
    whole = nf4.dequantize(layer.weight.data, state, torch.float32)
    pieces = list(nf4.column_blocks(layer.weight.data, state, 130, torch.float32))
    if in_features % 64:
        assert [(start, stop) for start, stop, _ in pieces] == [(0, in_features)]
    else:
        assert len(pieces) == in_features // 128 + (in_features % 128 > 0)
        assert all(stop - start == 128 for start, stop, _ in pieces[:-1])
    assert [start for start, _, _ in pieces] == [stop for _, stop, _ in [(0, 0, None)] + pieces[:-1]]
    assert torch.equal(torch.cat([columns for _, _, columns in pieces], 1), whole)


@pytest.mark.parametrize("four_bit", [False, True], ids=["linear", "nf4"])
def test_near_cancellation_stays_accurate(four_bit):
    """Rows where s·B_iA ≈ -W_i: the expanded sum would lose them to rounding; they are recomputed."""
    _, fast = _pair(256, 64, 32, four_bit=four_bit, r=16)
    module, dora = _fast_layers(fast)[0]  # "up": out 64, in 256
    w = _dense(module.get_base_layer())
    a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
    with torch.no_grad():
        a[:4] = w[:4]  # put rows 0..3 of W into A's row space...
        b[:4] = 0
        b[0, 0] = -1 / s  # ...and cancel them: exactly,
        b[1, 1] = -(1 - 1e-3) / s  # to 1e-3,
        b[2, 2] = -(1 - 1e-2) / s  # to 1e-2,
        b[3, 3] = -(1 + 1e-4) / s  # and past zero
    norm = dora.weight_norm(a, b, s, module.get_base_layer())
    expected = linear_norm_reference(w, a, b, s)
    assert torch.isfinite(norm).all() and (norm >= 0).all()
    row_scale = w.norm(dim=1).double()
    assert ((norm.double() - expected).abs() <= 1e-6 * row_scale).all()
    assert ((norm.double() - expected).abs()[4:] <= 1e-5 * expected[4:]).all()


def test_tiny_model_forward_backward_and_adapter_format(tiny_spec, tmp_path):
    """The real 4-bit tiny Gemma-3 (42 DoRA layers, gradient checkpointing): logits and every
    gradient match PEFT's DoRA over two accumulated micro-batches, steps refresh, and the adapter
    is PEFT's format (loads back into a plain PEFT DoRA model with identical logits).

    Tolerance 1e-4 here: six layers, a 1024-way softmax and the loss chain the per-layer fp32
    differences (seen: ≤ 3.5e-6 on the first micro-batches' gradients). After one SGD step at lr 0.5
    the two models' parameters already differ by them, so the second step's gradients get 3e-4
    (seen: 1.1e-4 on layer 0's q_proj)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trinity_core.train.backends.peft import PeftBackend

    ref, _ = PeftBackend().load(tiny_spec)  # backends patch: undo that for the reference
    assert any(isinstance(m, FastDoraLinearLayer) for m in ref.modules())
    for m in ref.modules():
        if isinstance(m, FastDoraLinearLayer):
            m.__class__ = qdora.DoraLinearLayer
    with torch.no_grad():  # non-zero B, as after some training
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    fast = copy.deepcopy(ref)
    assert enable_fast_dora(fast) == 42
    mlps = [m for m in fast.modules() if type(m).__name__ == "Gemma3MLP"]
    assert mlps and all("forward" in m.__dict__ and plain_fast_dora(m.gate_proj) and plain_fast_dora(m.up_proj)
                        for m in mlps), "every MLP takes the fused gated path"
    assert not any(plain_fast_dora(m.gate_proj) for m in ref.modules() if type(m).__name__ == "Gemma3MLP")
    ref.train(), fast.train()
    opt_ref = torch.optim.SGD(_trainable(ref).values(), lr=0.5)
    opt_fast = torch.optim.SGD(_trainable(fast).values(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    vocab = ref.config.vocab_size
    for step in range(2):
        for _ in range(2):
            ids = torch.randint(7, vocab, (1, 16), generator=gen)
            out_ref, out_fast = ref(input_ids=ids, labels=ids), fast(input_ids=ids, labels=ids)
            _assert_close(out_fast.logits, out_ref.logits, f"logits, step {step}", TINY_RTOL)
            out_ref.loss.backward()
            out_fast.loss.backward()
        grads = {n: p.grad for n, p in _trainable(ref).items()}
        for name, p in _trainable(fast).items():
            _assert_close(p.grad, grads[name], f"grad {name}, step {step}", TINY_RTOL * (1 if step == 0 else 3))
        opt_ref.step(), opt_fast.step()
        opt_ref.zero_grad(), opt_fast.zero_grad()

    assert get_peft_model_state_dict(fast).keys() == get_peft_model_state_dict(ref).keys()
    fast.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(
        tiny_spec.model.name_or_path, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    loaded = PeftModel.from_pretrained(nf4.exact_on_cpu(base), tmp_path / "adapter").eval()
    fast.eval()
    ids = torch.randint(7, vocab, (1, 16), generator=gen)
    with torch.no_grad():
        _assert_close(loaded(input_ids=ids).logits, fast(input_ids=ids).logits, "reloaded adapter")


def test_gated_mlp_falls_back_to_the_stock_forward_when_adapters_are_off(tiny_spec):
    """The fused MLP path only runs in plain fast-DoRA training/inference: with the adapter
    disabled (base-model evaluation) or merged it is the class's own forward, bit for bit."""
    from trinity_core.train.backends.peft import PeftBackend

    model, _ = PeftBackend().load(tiny_spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    ids = torch.randint(7, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    mlps = [m for m in model.modules() if "forward" in m.__dict__ and type(m).__name__ == "Gemma3MLP"]
    assert mlps
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        with model.disable_adapter():
            base_patched = model(input_ids=ids).logits
        saved = [m.__dict__.pop("forward") for m in mlps]
        stock = model(input_ids=ids).logits
        with model.disable_adapter():
            base_stock = model(input_ids=ids).logits
    for m, forward in zip(mlps, saved):
        m.forward = forward
    assert torch.equal(base_patched, base_stock)
    _assert_close(fused, stock, "fused MLP vs PEFT's per-projection DoRA", TINY_RTOL)
    assert not torch.allclose(fused, base_stock), "the adapter changes the output"


def test_run_options_turn_fast_dora_off(tiny_spec):
    """``RunOptions(fast_dora=False)``: the backend leaves PEFT's own DoRA layers (the benchmark's
    baseline); the default patches every one of them."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from trinity_core.options import RunOptions
    from trinity_core.train.backends.peft import PeftBackend

    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = True
    off = PeftBackend(RunOptions(fast_dora=False))
    model, _ = off.load(spec)
    dora = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    assert off.info()["fast_dora_layers"] == 0 and dora and not any(isinstance(m, FastDoraLinearLayer) for m in dora)
    on = PeftBackend()
    model, _ = on.load(spec)
    assert on.info()["fast_dora_layers"] == len(dora) == sum(isinstance(m, FastDoraLinearLayer) for m in model.modules())


def test_dora_output_gradients_are_exact_in_float64():
    """The hand-written backward of the fused DoRA output against autograd's numerical Jacobian."""
    gen = torch.Generator().manual_seed(0)
    t, out, r = 6, 5, 3
    base = torch.randn(2, t // 2, out, dtype=torch.float64, generator=gen, requires_grad=True)
    xa = torch.randn(2, t // 2, r, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(out, r, dtype=torch.float64, generator=gen, requires_grad=True)
    m = (1 + torch.rand(out, dtype=torch.float64, generator=gen)).requires_grad_()
    norm = 1 + torch.rand(out, dtype=torch.float64, generator=gen)
    # base is updated in place (its clone here stands for PEFT's fresh result tensor)
    fn = lambda base, xa, b, m: qdora.DoraOutput.apply(base.clone(), xa, b, m, norm, 0.7)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (base, xa, b, m))
    expected = (m / norm) * (base + 0.7 * xa @ b.T)  # PEFT's g·base + g·s·B(Ax), with g = m/‖·‖
    torch.testing.assert_close(fn(base, xa, b, m), expected)
    view = base.clone().transpose(0, 1)  # not updatable in place: the out-of-place path, same result
    y, dirty = qdora.DoraOutput.apply(view, xa.transpose(0, 1), b, m, norm, 0.7)
    assert dirty is None
    torch.testing.assert_close(y.transpose(0, 1), expected)


def test_lora_sum_gradients_are_exact_in_float64():
    """The in-place LoRA GEMM node of the fused MLP path against autograd's numerical Jacobian."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    xa = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    z = qdora.LoraSum.apply(base.clone(), xa, b, 0.7)
    torch.testing.assert_close(z, base + 0.7 * xa @ b.T)
    assert torch.autograd.gradcheck(lambda base, xa, b: qdora.LoraSum.apply(base.clone(), xa, b, 0.7), (base, xa, b))


def test_scale_and_reduce_cpu_path():
    gen = torch.Generator().manual_seed(0)
    dy, z, g = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen), torch.rand(5, generator=gen)
    dz, dyz = qdora.scale_and_reduce(dy, z, g)
    torch.testing.assert_close(dz, dy * g)
    torch.testing.assert_close(dyz, (dy.double() * z.double()).sum(0).float())


def test_cast_linear_gradients_are_exact_in_float64(monkeypatch):
    """:class:`CastLinear` (x saved in its own dtype, cast again in backward) against autograd's numerical
    Jacobian, and its value against ``F.linear`` on the cast input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(cast_input.CastLinear.apply, (x, w))
    monkeypatch.setattr(cast_input, "CHUNK_ELEMENTS", 7 * 3)  # A's gradient from blocks of 3 rows: same Jacobian
    assert torch.autograd.gradcheck(cast_input.CastLinear.apply, (x, w))
    x16 = torch.randn(2, 5, 7, generator=gen).to(torch.bfloat16)
    want = nn.functional.linear(x16.float(), w.float())
    # blocks of 3 rows: the same products, summed in another order by the GEMM library on some CPUs (1 ulp seen)
    torch.testing.assert_close(cast_input.CastLinear.apply(x16, w.float()), want, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()  # one GEMM: bit for bit
    torch.testing.assert_close(cast_input.CastLinear.apply(x16, w.float()), want, rtol=0, atol=0)


def _bf16_model(kind: str):
    """A bf16 model with fp32 DoRA adapters (PEFT's default upcast), fast DoRA on: two projections,
    16-bit (``block``) or NF4 with bf16 compute (``block_nf4``, widths multiples of the 64-value
    quantisation block, and one that is not: 96), or a Gemma-3 gated MLP (gate and up share their input)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

    torch.manual_seed(0)
    if kind.startswith("block"):
        module, targets, d_in = Block(128, 96, 64, False), ["up", "down"], 128
        module = module.to(torch.bfloat16)
        if kind == "block_nf4":
            for name in ("up", "down"):
                lin = getattr(module, name)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, name, q.to("cpu"))
    else:
        config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, hidden_activation="gelu_pytorch_tanh")
        module, targets, d_in = Gemma3MLP(config).to(torch.bfloat16), ["gate_proj", "up_proj", "down_proj"], 64
    model = get_peft_model(module, LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=True,
                                              target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert enable_fast_dora(model) == len(targets)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    return model, d_in


def _autograd_base_and_a(module, name, x):
    """What :func:`base_and_adapter_input` replaces: the base's forward and ``lora_A(x.to(fp32))``
    through autograd (the fp32 cast kept for backward, two input gradients summed)."""
    weight = module.lora_A[name].weight
    return module.get_base_layer()(x), nn.functional.linear(x.to(weight.dtype), weight)


@pytest.mark.parametrize("chunk", [1 << 24, 64 * 3], ids=["one_block", "column_blocks"])
@pytest.mark.parametrize("kind", ["block", "block_nf4", "gemma3_mlp"])
def test_cast_adapter_inputs_are_saved_in_their_own_dtype(kind, chunk, monkeypatch):
    """Outside autocast with a 16-bit base and fp32 adapters (Unsloth's T4 path feeds fp16 inputs to
    fp32 adapters), fast DoRA's layers keep no fp32 copy of an adapted projection's input for backward,
    with the same output and gradients as the base and ``lora_A(x.to(fp32))`` through autograd (which
    keeps one copy per projection) and, for plain projections, as the class's own forward (PEFT's).
    ``chunk``: the input gradient from blocks of W's columns (3 rows of 64 values a block)."""
    from trinity_core.train.fast_dora import mlp

    monkeypatch.setattr(cast_input, "CHUNK_ELEMENTS", chunk)
    model, d_in = _bf16_model(kind)
    x = torch.randn(4, 5, d_in, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(patched) == (2 if kind.startswith("block") else 4)  # the projections (and the MLP)

    def run(mode: str):
        saved = []
        forwards = {m: m.__dict__.pop("forward") for m in patched if mode == "class_forward"}
        with monkeypatch.context() as mp:
            if mode == "autograd":
                mp.setattr(qdora, "base_and_adapter_input", _autograd_base_and_a)
                mp.setattr(mlp, "base_and_adapter_input", _autograd_base_and_a)
            xg = x.clone().requires_grad_()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = model(xg)
            y.float().square().sum().backward()
        for m, forward in forwards.items():
            m.forward = forward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        fp32_inputs = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.dim() >= 2
                       and t.reshape(-1, t.shape[-1]).shape[0] == 20 and t.shape[-1] in (64, 96, 128)]
        return y, xg.grad, grads, fp32_inputs

    y, dx, grads, fp32_inputs = run("fast")
    assert fp32_inputs == []
    for mode in ["autograd"] + (["class_forward"] if kind.startswith("block") else []):
        y_ref, dx_ref, grads_ref, fp32_ref = run(mode)
        assert len(fp32_ref) == (2 if kind.startswith("block") else 3), f"{mode} keeps the fp32 casts: {fp32_ref}"
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
        for name, g in grads.items():
            _assert_close(g, grads_ref[name], f"{mode}: grad {name}", rtol=1e-6)


def test_a_consumable_input_gets_its_gradient_written_over_it():
    """:func:`cast_input.consumable` (the gated MLP's activation, read by down_proj only): the cast-path
    node takes A's gradient first, then writes x's gradient over x, with the same values as without the
    mark; a second backward through it raises rather than read a gradient as an activation."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(64, 32, bias=False).to(torch.bfloat16).requires_grad_(False)
    a = torch.randn(8, 64, generator=gen, requires_grad=True)
    x = torch.randn(20, 64, generator=gen).to(torch.bfloat16)
    d_base, d_xa = torch.randn(20, 32, generator=gen).to(torch.bfloat16), torch.randn(20, 8, generator=gen)

    def run(consume: bool, retain: bool = False):
        xg = x.clone().requires_grad_()
        h = xg * 1  # a fresh tensor, as the activation is
        if consume:
            cast_input.consumable(h)
        h.retain_grad()
        node_out = cast_input.FrozenBaseAndA.apply(h, a, base, consume)
        torch.autograd.backward(node_out, (d_base, d_xa), retain_graph=retain)
        grads = (h.grad.clone(), a.grad.clone())
        a.grad = None
        return h, grads

    h_kept, (dx_kept, da_kept) = run(False)
    h_used, (dx_used, da_used) = run(True)
    assert torch.equal(h_kept, x) and not torch.equal(h_used, x), "the mark lets backward reuse x's memory"
    assert torch.equal(h_used, dx_used) and torch.equal(dx_used, dx_kept) and torch.equal(da_used, da_kept)
    xg = x.clone().requires_grad_()
    outs = cast_input.FrozenBaseAndA.apply(cast_input.consumable(xg * 1), a, base, True)
    torch.autograd.backward(outs, (d_base, d_xa), retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        torch.autograd.backward(outs, (d_base, d_xa))


def test_cast_linear_in_row_blocks_gives_the_same_values(monkeypatch):
    """The adapter-input cast of the forward, a block of rows at a time (down_proj's whole fp32 cast
    set the T4 path's peak), against the cast and one GEMM."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 7, 64, generator=gen).to(torch.bfloat16), torch.randn(8, 64, generator=gen)
    want = nn.functional.linear(x.float(), w)
    monkeypatch.setattr(cast_input, "CHUNK_ELEMENTS", 64 * 4)  # 4 rows a block: 6 blocks, the last of 1 row
    got = cast_input.cast_linear(x, w)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
