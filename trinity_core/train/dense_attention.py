"""Gemma-3's training attention through dense kernels where its mask is plain: causal, or causal within a window.

transformers runs Gemma-3 under flex attention (what Unsloth's loader chooses for it) with a block mask per layer
kind. At the 12B shape (16 query / 8 key-value heads of 256, seq 4096) on an H200, forward + backward of one layer's
attention took, by kernel (``python bench/attention_kernels.py``, call 47, raw
``bench/results/2026-11-30-h200-attention-kernels-47.txt``):

    sliding (window 1024)   flex (compiled, IS_DIVISIBLE) 1.965 ms   torch's FlashAttention-2 (left window) 1.259 ms
    global (causal)         flex 3.720 ms                             FlashAttention-2 2.404 ms   cuDNN (SDPA) 1.449 ms

within the same error against an fp32 reference. Flex attention's Triton templates at head dim 256 are the slow
part; a plain causal or sliding-window mask needs none of its generality. So where the mask is plain, the layer's
attention runs torch's built-in kernels instead: a global layer SDPA's cuDNN backend, causal (H200, 4 layers, every
2nd global, call 50: +4.2% tok/s, 20.8 ms less device time an optimizer step); a sliding layer (:data:`SLIDING`)
cuDNN's banded kernel through cudnn-frontend's op where that optional package is installed and this is a Hopper GPU
(:data:`SLIDING_KERNEL`; H200, 48 layers, call 61: +2.2% tok/s; elsewhere flex attention), or
``aten._flash_attention_forward`` with ``window_size_left = window - 1`` (transformers' sliding overlay keeps keys
with ``kv > q - window``; no gain in the layers, see :data:`SLIDING`); each with its own backward; cuDNN's kernels
take q, k and v in the projections' memory order (:data:`PROJECTION_LAYOUT`). Anything else (padding, packed
sequences, image tokens' bidirectional blocks, offsets, a KV cache, dropout, softcapping, fp32 on CUDA) goes to
transformers' flex attention as before.

Who knows the mask is plain: :mod:`trinity_core.train.block_masks` builds the masks of unpadded batches and
classifies each once, on its first build, by evaluating its mask function densely against causal ∧ window
(:func:`~trinity_core.train.block_masks.CachedMasks.pattern_of`). The compiled decoder layers
(:mod:`trinity_core.train.compiled_layers`) look their ``attention_mask`` up there, outside the compiled region,
and pass the pattern down as the ``dense_attention`` keyword, which reaches the attention function through the
layer's and Unsloth's attention forward's ``**kwargs`` (as ``kernel_options`` does). :func:`install` puts
:class:`DenseAttention` in front of transformers' ``flex_attention`` entry (Unsloth's Gemma-3 forward looks its
attention function up there by that name): with the keyword it runs the dense kernel, without it transformers'
function as it is.

On CPU (the tests) a plain pattern runs SDPA with the same mask the CUDA kernels apply (built from the same
window numbers), so the dispatch and the window arithmetic are exercised; the CUDA kernels' values against flex
attention's are checked by ``tests/gpu/test_dense_attention_cuda.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trinity_core.train import interface_fronts

KEYWORD = "dense_attention"
"""The keyword the compiled layers pass a :class:`Pattern` down with."""

GLOBAL_KERNEL = "cudnn"
"""A causal (global) layer's kernel on CUDA: "cudnn" (SDPA's cuDNN backend) or "flash" (FlashAttention-2, as the
sliding layers); bench/attention_kernels.py measures both."""


SLIDING = True
"""Sliding layers' plain masks through a dense kernel too (:data:`SLIDING_KERNEL`). With FlashAttention-2 it was no
gain in the layers (4 of the 12B shape, H200, call 49): the kernel saved what inductor's fusions lost. Flex attention's
templates take the q/k norm as a prologue and RoPE's backward into their own; around an opaque kernel those run on
their own, with FlashAttention-2's layout copies and the grouped heads' gradient sum: attention 37.6 → 22.9 ms an
optimizer step, other kernels +16.5 ms, 48495 against 49024 tok/s (``bench/profile_diff.py``). cuDNN's banded kernel
(the default, below) needs neither copy nor sum and is a gain in the layers (call 61)."""

SLIDING_KERNEL = "cudnn"
"""A sliding layer's kernel where :data:`SLIDING` is on: "cudnn" (the default) cuDNN's fused attention with a
diagonal band, through the ``torch.ops.cudnn.sdpa_fwd`` op of NVIDIA's cudnn-frontend (``nvidia-cudnn-frontend``,
optional: without it, off Hopper, or where :func:`load_cudnn_frontend`'s probe fails, the layer keeps flex attention
and :func:`applies` says why), or "flash" (torch's FlashAttention-2 with a left window). cuDNN takes the BHSD layout
and the grouped key-value heads as they are, as the global layers' SDPA cuDNN path does. The band: keys ``k`` with
``q - window < k <= q`` (cuDNN's left bound is that count, ``window``). H200, the 12B's pattern at 48 layers (40
sliding, 8 global), no checkpointing, LoRA, call 61 (``bench/results/2026-11-30-h200-cudnnsliding-61.jsonl``):
9025.5 tok/s with it against 8827.6 with flex on the sliding layers, **+2.2%** in the same run; with
:data:`PROJECTION_LAYOUT` as well 9142.4 and 9257.2 tok/s (calls 67 and 69, 1.101× and 1.121× Unsloth's compiled
LoRA). Alone (call 61, ``bench/attention_kernels.py``) it runs a sliding layer forward + backward in 1.195 ms
against flex's 1.865."""

PROJECTION_LAYOUT = True
"""cuDNN's kernels (a sliding layer's band, a global layer's SDPA) take their q, k and v in the projections' own
memory order, (batch, seq, heads, dim), seen as (batch, heads, seq, dim) through strides, and so return the output
and the gradients: the compiled layer's RoPE writes q and k in that order, v is the projection itself, the output
is o_proj's input as it is, and the output's gradient o_proj's. Off, the layer hands them over (batch, heads, seq,
dim)-contiguous, as transformers' attention does, and inductor copies each of q, k, v, the output and its gradient
between the two orders (a profiled step, call 66: ~0.4 ms of copy kernels a sliding layer's forward + backward).
H200, call 61's rows: +2.3% and +3.3% tok/s (calls 67 and 69) and 1.5 GiB less peak memory without checkpointing."""

CUDNN_CAPABILITY = 9
"""The compute capability (major) cuDNN's banded kernel is used on: Hopper, where it was measured (H200)."""

_CUDNN_SDPA: Callable | None = None
"""``torch.ops.cudnn.sdpa_fwd`` once :func:`load_cudnn_frontend` has imported the module that registers it."""
_CUDNN_ERROR: str | None = None


@dataclass(frozen=True)
class Pattern:
    """A plain attention mask: causal, and with ``window`` keys kept per query (the query's own and the
    ``window - 1`` before it; None: all before it). One object per window (:func:`pattern`), so Dynamo's guard on
    it is an identity check."""

    window: int | None

    @property
    def flash_window(self) -> tuple[int, int]:
        """FlashAttention's (left, right) window: keys from ``q - left`` to ``q + right`` (-1: unbounded)."""
        return _flash_window(self.window)


def _flash_window(window: int | None) -> tuple[int, int]:
    return (-1 if window is None else window - 1, 0)


_PATTERNS: dict[int | None, Pattern] = {}


def pattern(window: int | None) -> Pattern:
    """The :class:`Pattern` of ``window`` (one object each)."""
    return _PATTERNS.setdefault(window, Pattern(window))


def classify(dense: torch.Tensor) -> Pattern | None:
    """The :class:`Pattern` a dense boolean mask (..., queries, keys) is, with queries and keys at the same
    positions; None if it is not one (or differs between its leading entries)."""
    q_len, kv_len = dense.shape[-2:]
    if q_len != kv_len or q_len == 0:
        return None
    kept = int(dense[..., -1, :].reshape(-1, kv_len)[0].sum())
    window = None if kept >= kv_len else kept
    if window == 0:
        return None
    expected = expected_mask(q_len, window, dense.device)
    return pattern(window) if bool((dense == expected).all()) else None


def expected_mask(length: int, window: int | None, device: Any = None) -> torch.Tensor:
    """The (length, length) boolean mask FlashAttention applies for ``window`` (:attr:`Pattern.flash_window`)."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    left, right = _flash_window(window)
    keep = k <= q + right
    return keep & (k >= q - left) if left >= 0 else keep


def load_cudnn_frontend() -> str | None:
    """Import cudnn-frontend's torch ops and probe them once (outside a compiled region, where :func:`install` calls
    it): None if ``torch.ops.cudnn.sdpa_fwd`` is there and ran a banded forward + backward on this GPU at head dim
    256 with grouped heads, else why not (not installed, no cuDNN it can load, not Hopper, the probe raised)."""
    global _CUDNN_SDPA, _CUDNN_ERROR
    if _CUDNN_SDPA is None and _CUDNN_ERROR is None:
        try:
            import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd and autograd)
        except Exception as error:  # not installed, or no cuDNN library it can load
            _CUDNN_ERROR = f"cudnn-frontend not importable ({type(error).__name__}: {str(error)[:120]})"
            return _CUDNN_ERROR
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != CUDNN_CAPABILITY:
            _CUDNN_ERROR = (f"cuDNN's banded kernel is used on compute capability {CUDNN_CAPABILITY}.x only "
                            "(measured there)")
            return _CUDNN_ERROR
        try:
            _CUDNN_SDPA = _probe()
        except Exception as error:  # no op registered, no engine for the band at this shape, or another failure
            _CUDNN_ERROR = f"cudnn-frontend's probe failed ({type(error).__name__}: {str(error)[:120]})"
    return _CUDNN_ERROR


def sliding_kernel() -> str:
    """What a sliding layer's plain mask runs on a CUDA machine after :func:`install`: "cudnn", "flash", or
    "flex (why)" (the job's backend info reports it)."""
    if not SLIDING:
        return "flex (SLIDING off)"
    if SLIDING_KERNEL == "cudnn" and _CUDNN_SDPA is None:
        return f"flex ({_CUDNN_ERROR or 'cudnn-frontend not loaded'})"
    return SLIDING_KERNEL


def _probe() -> Callable:
    """``torch.ops.cudnn.sdpa_fwd`` after one banded forward + backward through it (bf16, 2 query heads over 1
    key-value head of 256, 256 positions, window 64), so a cuDNN without an engine for it fails here and not in a
    training step."""
    op = torch.ops.cudnn.sdpa_fwd
    q = torch.randn(1, 2, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 1, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out, _ = op(q, k, v, 256 ** -0.5, is_causal=True, window_left=64, return_lse=True)
    out.float().sum().backward()
    torch.cuda.synchronize()
    if not all(bool(t.grad.isfinite().all()) for t in (q, k, v)):
        raise ValueError("non-finite gradients")
    return op


def _dense_cuda(query, key, value, window: int | None, scale: float) -> torch.Tensor:
    """(batch, heads, seq, dim) in; (batch, seq, heads, dim) out, as transformers' flex attention returns it."""
    length = query.shape[2]
    if PROJECTION_LAYOUT and (SLIDING_KERNEL if window is not None else GLOBAL_KERNEL) == "cudnn":
        query, key, value = (_projection_order(x) for x in (query, key, value))
    if window is not None and SLIDING_KERNEL == "cudnn":
        out, _ = _CUDNN_SDPA(query, key, value, scale, is_causal=True, window_left=window, return_lse=True)
        return out.transpose(1, 2)
    if window is None and GLOBAL_KERNEL == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    left, right = _flash_window(window)
    return torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, None, length, length, 0.0, True,
        False, scale=scale, window_size_left=left, window_size_right=right)[0]


def _projection_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, heads, seq, dim) with (batch, seq, heads, dim) memory (:data:`PROJECTION_LAYOUT`): a view where
    it already is (v), else one copy, which inductor writes from the producing kernel (q's and k's RoPE)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _dense_reference(query, key, value, window: int | None, scale: float) -> torch.Tensor:
    """What :func:`_dense_cuda` computes, through SDPA with :func:`expected_mask` (CPU, fp32: the tests)."""
    mask = expected_mask(query.shape[2], window, query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def applies(query: torch.Tensor, key: torch.Tensor, dropout: float, softcap: Any, kwargs: dict,
            plain: Pattern | None = None) -> str | None:
    """Why the dense kernel does not apply to this call (None: it does)."""
    if plain is not None and plain.window is not None:
        if not SLIDING:
            return "a sliding window (SLIDING off)"
        if SLIDING_KERNEL == "cudnn" and query.is_cuda and _CUDNN_SDPA is None:
            return _CUDNN_ERROR or "cudnn-frontend not loaded (load_cudnn_frontend)"
    if dropout:
        return "dropout"
    if softcap:
        return "softcapping"
    if any(kwargs.get(name) is not None for name in ("head_mask", "s_aux", "position_bias")):
        return "head mask, sinks or position bias"
    if query.shape[2] != key.shape[2]:
        return "queries and keys of different lengths (a KV cache)"
    if query.shape[1] % key.shape[1]:
        return "query heads not a multiple of key heads"
    if query.is_cuda:
        if query.dtype not in (torch.float16, torch.bfloat16):
            return f"{query.dtype} on CUDA"
        if query.shape[-1] > 256 or query.shape[-1] % 8:
            return f"head dim {query.shape[-1]}"
    return None


class DenseAttention:
    """transformers' flex-attention function with the dense kernels in front (module docstring). ``calls``
    counts the calls by kernel ("dense", "flex"); ``declined`` why a pattern's call went to flex."""

    def __init__(self, flex: Callable) -> None:
        self.flex = flex
        self.calls = {"dense": 0, "flex": 0}
        self.declined: dict[str, int] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        plain: Pattern | None = kwargs.pop(KEYWORD, None)
        dropout = kwargs.get("dropout", 0.0)
        why = "no plain mask" if plain is None else applies(query, key, dropout, softcap, kwargs, plain)
        if why is not None:
            if not torch.compiler.is_compiling():
                self.calls["flex"] += 1
                if plain is not None:
                    self.declined[why] = self.declined.get(why, 0) + 1
            return self.flex(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)
        if not torch.compiler.is_compiling():
            self.calls["dense"] += 1
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        run = _dense_cuda if query.is_cuda else _dense_reference
        return run(query, key, value, plain.window, scale), None


_WHERE = "transformers.modeling_utils:ALL_ATTENTION_FUNCTIONS"


def install() -> DenseAttention | None:
    """Put a :class:`DenseAttention` in front of transformers' ``flex_attention`` attention function, for every
    model of the process (the interface is one object); once. None where transformers has none. With
    :data:`SLIDING` and ``SLIDING_KERNEL == "cudnn"`` on a CUDA machine, cudnn-frontend's op is imported (and probed)
    here."""
    if SLIDING and SLIDING_KERNEL == "cudnn" and torch.cuda.is_available():
        load_cudnn_frontend()
    return interface_fronts.install(_WHERE, "flex_attention", DenseAttention)


def installed() -> DenseAttention | None:
    """The :class:`DenseAttention` :func:`install` put in front of the flex-attention function, if any."""
    return interface_fronts.installed(_WHERE, "flex_attention", DenseAttention)


def uninstall() -> None:
    """transformers' function back (tests)."""
    interface_fronts.uninstall(_WHERE, "flex_attention", DenseAttention, "flex")


__all__ = ["CUDNN_CAPABILITY", "GLOBAL_KERNEL", "KEYWORD", "PROJECTION_LAYOUT", "SLIDING", "SLIDING_KERNEL",
           "DenseAttention", "Pattern", "applies", "classify", "expected_mask", "install", "installed",
           "load_cudnn_frontend", "pattern", "sliding_kernel", "uninstall"]
