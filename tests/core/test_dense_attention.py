"""Plain masks' attention through dense kernels (``trinity_core.train.dense_attention``): which masks are plain,
the window arithmetic the CUDA kernels get, and the compiled layers' dispatch. On the CPU the dense path is SDPA
with the mask the CUDA kernels apply; their values against flex attention's: tests/gpu/test_dense_attention_cuda.py."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.core.flex_masks import flex_config, gemma3_masks
from trinity_core.train import block_masks, compiled_layers, dense_attention
from trinity_core.train.compiled_layers import compile_decoder_layers
from trinity_core.train.dense_attention import classify, expected_mask, pattern


@pytest.fixture
def installed():
    block_masks.uninstall(), dense_attention.uninstall()
    masks, dense = block_masks.install(), dense_attention.install()
    assert dense is not None and dense_attention.installed() is dense and dense_attention.install() is dense
    yield masks, dense
    block_masks.uninstall(), dense_attention.uninstall()
    assert dense_attention.installed() is None


def test_plain_masks_are_told_from_others():
    n = 12
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = k <= q
    assert classify(causal) is pattern(None) and pattern(None) is pattern(None)
    assert classify(causal & (k > q - 4)) is pattern(4)  # transformers' sliding overlay: kv > q - window
    assert pattern(4).flash_window == (3, 0) and pattern(None).flash_window == (-1, 0)
    assert torch.equal(expected_mask(n, 4), causal & (k > q - 4)) and torch.equal(expected_mask(n, None), causal)
    assert classify(causal & (k > q - n - 5)) is pattern(None), "a window longer than the sequence binds nothing"
    assert classify(torch.ones(n, n, dtype=torch.bool)) is None, "bidirectional"
    assert classify(causal & (k >= q - 4)) is pattern(5)
    broken = (causal & (k > q - 4)).clone()
    broken[5, 2] = False
    assert classify(broken) is None, "one query short of the window"
    assert classify(causal[:, :-1]) is None, "queries and keys of different lengths"
    assert classify(causal & (k > q)) is None, "no key at all"


@pytest.fixture(scope="module")
def config():
    return flex_config()


def test_transformers_masks_are_classified_when_built_and_forgotten_when_dropped(config, installed, monkeypatch):
    masks, _ = installed
    causal, sliding = gemma3_masks(config, 256)
    assert masks.pattern_of(causal) is pattern(None) and masks.pattern_of(sliding) is pattern(64)
    short = gemma3_masks(config, 48)  # within the window: both causal
    assert [masks.pattern_of(m) for m in short] == [pattern(None), pattern(None)]
    padded = torch.ones(1, 256, dtype=torch.long)
    padded[0, :3] = 0
    assert not any(masks.pattern_of(m) for m in gemma3_masks(config, 256, attention_mask=padded))
    packed = torch.cat([torch.arange(100), torch.arange(156)]).unsqueeze(0)
    assert not any(masks.pattern_of(m) for m in gemma3_masks(config, 256, position_ids=packed))
    assert masks.pattern_of(object()) is None
    monkeypatch.setattr(block_masks, "MAX_ENTRIES", 2)
    gemma3_masks(config, 128)  # two new entries push the older ones out, their patterns with them
    assert masks.pattern_of(causal) is None and len(masks.patterns) == len(masks.entries) == 2


def _qkv(seq, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, seq, dim, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("window", [None, 24])
def test_the_dense_path_computes_what_flex_attention_does(config, installed, window, monkeypatch):
    """Through the installed function: with the pattern, the dense path; without it, transformers' flex attention
    with the block mask; the same values (forward: flex attention has no backward on the CPU). A sliding window
    goes to flex attention unless ``SLIDING`` (module docstring: not faster in the layers, call 49)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if window:
        monkeypatch.setattr(dense_attention, "SLIDING", False)
        q, k, v = (t.detach() for t in _qkv(8))
        assert dense_attention.applies(q, k, 0.0, None, {}, pattern(window)) == "a sliding window (SLIDING off)"
        assert dense_attention.applies(q, k, 0.0, None, {}, pattern(None)) is None
    monkeypatch.setattr(dense_attention, "SLIDING", True)

    masks, dense = installed
    seq = 96

    def mask_mod(b, h, q, k):
        return (k <= q) & (k > q - window) if window else k <= q

    block = create_block_mask(mask_mod, 1, None, seq, seq, device="cpu")
    q, k, v = (t.detach() for t in _qkv(seq))  # flex attention refuses CPU tensors that require grad
    module = torch.nn.Module()
    module.training, module.is_causal = False, True
    before = dict(dense.calls)
    with torch.no_grad():
        flex, _ = dense(module, q, k, v, block, scaling=0.25)
        ours, lse = dense(module, q, k, v, block, scaling=0.25, dense_attention=pattern(window))
    assert lse is None and ours.shape == flex.shape == (1, seq, 4, 16)
    torch.testing.assert_close(ours, flex, rtol=1e-5, atol=1e-5)
    assert dense.calls == {"dense": before["dense"] + 1, "flex": before["flex"] + 1}
    with torch.no_grad(), pytest.raises(ValueError, match="dropout"):
        dense(module, q, k, v, block, scaling=0.25, dense_attention=pattern(window), dropout=0.1)
    assert dense.declined == {"dropout": 1}, "dropout goes to flex attention (which refuses it in training)"


def test_what_the_dense_kernels_cannot_do_goes_to_flex_attention():
    q, k, _ = _qkv(8)
    assert dense_attention.applies(q, k, 0.0, None, {}) is None
    assert dense_attention.applies(q, k, 0.1, None, {}) == "dropout"
    assert dense_attention.applies(q, k, 0.0, 50.0, {}) == "softcapping"
    assert dense_attention.applies(q, k[:, :, :4], 0.0, None, {}) is not None, "a KV cache"
    assert dense_attention.applies(q[:, :3], k, 0.0, None, {}) is not None, "3 query heads over 2"
    assert dense_attention.applies(q, k, 0.0, None, {"s_aux": torch.zeros(1)}) is not None


def test_a_sliding_layer_s_cudnn_kernel_needs_cudnn_frontend(monkeypatch):
    """``SLIDING_KERNEL = "cudnn"``: on CUDA a sliding pattern runs cuDNN's banded kernel only where cudnn-frontend's op
    was imported (:func:`load_cudnn_frontend`, which :func:`install` calls); without it the layer keeps flex attention
    and the reason says why. On the CPU the dense path is the reference either way (not CUDA)."""
    from types import SimpleNamespace

    monkeypatch.setattr(dense_attention, "SLIDING", True)
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "cudnn")
    monkeypatch.setattr(dense_attention, "_CUDNN_SDPA", None)
    monkeypatch.setattr(dense_attention, "_CUDNN_ERROR", None)
    cuda_q = SimpleNamespace(shape=(1, 16, 64, 256), is_cuda=True, dtype=torch.bfloat16)
    cuda_k = SimpleNamespace(shape=(1, 8, 64, 256), is_cuda=True, dtype=torch.bfloat16)
    assert dense_attention.applies(cuda_q, cuda_k, 0.0, None, {}, pattern(16)).startswith("cudnn-frontend not loaded")
    assert dense_attention.applies(cuda_q, cuda_k, 0.0, None, {}, pattern(None)) is None, "global layers: SDPA's cuDNN"
    error = dense_attention.load_cudnn_frontend()  # not installed on the CPU machines
    assert error and error.startswith("cudnn-frontend not importable") and dense_attention.load_cudnn_frontend() == error
    assert dense_attention.applies(cuda_q, cuda_k, 0.0, None, {}, pattern(16)) == error
    monkeypatch.setattr(dense_attention, "_CUDNN_SDPA", object())  # as after a successful import
    assert dense_attention.applies(cuda_q, cuda_k, 0.0, None, {}, pattern(16)) is None
    q, k, _ = _qkv(8)
    monkeypatch.setattr(dense_attention, "_CUDNN_SDPA", None)
    assert dense_attention.applies(q, k, 0.0, None, {}, pattern(4)) is None, "CPU: the reference"
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "flash")
    assert dense_attention.applies(cuda_q, cuda_k, 0.0, None, {}, pattern(16)) is None


def test_the_sliding_kernel_is_reported_and_needs_hopper_and_a_working_probe(monkeypatch):
    """What the job's backend info reports for sliding layers (:func:`sliding_kernel`), and the gates of
    :func:`load_cudnn_frontend` after a successful import: a Hopper GPU (where the band was measured), then a probe
    that ran; either failing leaves the sliding layers on flex attention with the reason."""
    import sys
    from types import ModuleType

    for name in ("cudnn", "cudnn.sdpa", "cudnn.sdpa.fwd", "cudnn.sdpa.fwd.torch_op"):  # an importable frontend
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    monkeypatch.setattr(dense_attention, "SLIDING", True)
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "cudnn")
    monkeypatch.setattr(dense_attention, "_CUDNN_SDPA", None)
    monkeypatch.setattr(dense_attention, "_CUDNN_ERROR", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    error = dense_attention.load_cudnn_frontend()
    assert error == "cuDNN's banded kernel is used on compute capability 9.x only (measured there)"
    assert dense_attention.sliding_kernel() == f"flex ({error})"

    def failing():
        raise RuntimeError("no engine")
    monkeypatch.setattr(dense_attention, "_CUDNN_ERROR", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(dense_attention, "_probe", failing)
    assert dense_attention.load_cudnn_frontend() == "cudnn-frontend's probe failed (RuntimeError: no engine)"
    assert dense_attention._CUDNN_SDPA is None

    monkeypatch.setattr(dense_attention, "_CUDNN_SDPA", object())  # as after an import and a probe that ran
    assert dense_attention.sliding_kernel() == "cudnn"
    monkeypatch.setattr(dense_attention, "SLIDING_KERNEL", "flash")
    assert dense_attention.sliding_kernel() == "flash"
    monkeypatch.setattr(dense_attention, "SLIDING", False)
    assert dense_attention.sliding_kernel() == "flex (SLIDING off)"


@pytest.mark.parametrize("sliding", [True, False])
def test_compiled_layers_pass_plain_masks_down_and_train_as_the_eager_model(tiny_spec, installed, sliding,
                                                                            monkeypatch):
    """The tiny Gemma-3 (LoRA, flex attention) in compiled layers: every layer call of an unpadded batch gets its
    mask's pattern, and the loss and gradients are the eager model's under SDPA (fp32 rounding), at a length past
    the sliding window (both patterns) and within it; a padded batch's calls get none. With ``SLIDING`` off the
    sliding layers' calls run flex attention (no backward on the CPU: forward only there)."""
    from trinity_core.train.backends.peft import PeftBackend

    monkeypatch.setattr(dense_attention, "SLIDING", sliding)

    masks, dense = installed
    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    spec.model.attention = "flex_attention"
    fast, _ = PeftBackend().load(spec)
    window = fast.config.sliding_window
    kinds = set(fast.config.layer_types)
    assert kinds == {"sliding_attention", "full_attention"}, kinds
    eager = copy.deepcopy(fast)
    eager.config._attn_implementation = "sdpa"
    for layer in eager.modules():
        if hasattr(layer, "config") and layer.config is not eager.config:
            layer.config._attn_implementation = "sdpa"
    torch._dynamo.reset()
    assert compile_decoder_layers(fast, backend="aot_eager") == fast.config.num_hidden_layers
    state = next(m._trinity_region_state for m in fast.modules() if hasattr(m, "_trinity_region_state"))
    fast.train(), eager.train()
    if not sliding:
        ids = torch.randint(7, fast.config.vocab_size, (1, window + 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(fast(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss,
                                       rtol=1e-5, atol=1e-6)
        assert state.dense_calls == fast.config.num_hidden_layers
        return
    for seq in (window + 40, window // 2):
        ids = torch.randint(7, fast.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        calls = state.dense_calls
        losses = []
        for model in (eager, fast):
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        recomputed = 2 if fast.is_gradient_checkpointing else 1  # the backend's checkpointing runs each layer again
        assert state.dense_calls - calls == recomputed * fast.config.num_hidden_layers, "every layer call"
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        grads = [(n, p.grad) for n, p in fast.named_parameters() if p.requires_grad]
        reference = dict((n, p.grad) for n, p in eager.named_parameters() if p.requires_grad)
        assert grads and all(g is not None for _, g in grads)
        for name, grad in grads:
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    used = {masks.pattern_of(m) for m in masks.entries.values()}
    assert used >= {pattern(window), pattern(None)}, used
    padded = torch.ones(1, window + 40, dtype=torch.long)
    padded[0, -5:] = 0
    calls = state.dense_calls
    with torch.no_grad():
        fast(input_ids=ids.new_full((1, window + 40), 9), attention_mask=padded)
    assert state.dense_calls == calls, "a padded batch's mask is not plain"


def test_layers_pass_a_pattern_only_with_both_the_cache_and_the_dense_function(config):
    block_masks.uninstall(), dense_attention.uninstall()
    try:
        block_masks.install()
        causal, sliding = gemma3_masks(config, 256)
        assert compiled_layers._plain_pattern(causal) is None, "no dense function: nothing to pass"
        dense_attention.install()
        assert compiled_layers._plain_pattern(causal) is pattern(None)
        assert compiled_layers._plain_pattern(sliding) is pattern(64)
        assert compiled_layers._plain_pattern(None) is None and compiled_layers._plain_pattern(object()) is None
        block_masks.uninstall()
        assert compiled_layers._plain_pattern(causal) is None, "no cache: no classification"
    finally:
        block_masks.uninstall(), dense_attention.uninstall()


_SEEN_STRIDES: list[tuple[int, ...]] = []


@torch.library.custom_op("trinity_test::opaque_attention", mutates_args=())
def _opaque_attention(query: torch.Tensor) -> torch.Tensor:
    """An opaque kernel as cuDNN's op is to inductor (a custom op, default layout constraint): records the strides
    it is handed."""
    _SEEN_STRIDES.append(tuple(query.stride()))
    return query.clone()


@_opaque_attention.register_fake
def _(query):
    return torch.empty_like(query)


_opaque_attention.register_autograd(lambda ctx, grad: grad)  # the clone's gradient


def test_the_projection_layout_reaches_an_opaque_kernel_through_inductor():
    """PROJECTION_LAYOUT's premise: the compiled layer's q (the projection through qkv_heads' RMSNorm and RoPE, made
    heads-contiguous there) reaches an opaque kernel (a custom op, as cuDNN's is to inductor) in the projection's
    (batch, seq, heads, dim) memory order where dense_attention puts it in that order; inductor writes it so from
    the RoPE kernel (on an H200, call 67: the copy kernels around cuDNN's are gone)."""
    from trinity_core.train.compiled_kernels import qkv_heads

    batch, seq, heads, dim = 1, 16, 4, 8
    proj = torch.nn.Linear(32, heads * dim, bias=False)
    cos, sin, norm = torch.randn(batch, seq, dim), torch.randn(batch, seq, dim), torch.randn(dim)

    def layer(x, order):
        y = proj(x)
        q, _, _ = qkv_heads(y, y, y, cos, sin, norm, norm, 1e-6, 1e-6, heads, heads)
        q = order(q)
        return _opaque_attention(q).transpose(1, 2).reshape(batch, seq, heads * dim)

    x = torch.randn(batch, seq, 32)
    for order, strides in ((dense_attention._projection_order, (seq * heads * dim, dim, heads * dim, 1)),
                           (lambda q: q, (seq * heads * dim, seq * dim, dim, 1))):
        _SEEN_STRIDES.clear()
        torch._dynamo.reset()
        out = torch.compile(layer, backend="inductor", fullgraph=True)(x, order)
        torch.testing.assert_close(out, layer(x, order))
        out.sum().backward()  # a training graph, as the layers' (forward and backward compiled together)
        assert _SEEN_STRIDES[0] == strides
