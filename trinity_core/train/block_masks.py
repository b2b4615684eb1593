"""Flex attention's block masks built once per shape, not once per micro-batch.

transformers builds Gemma-3's two masks (causal, and causal within the sliding window) at the start of every forward
through ``flex_attention_mask``: a ``torch.compile``'d ``create_block_mask`` behind a fresh closure. On the H200 hosts
its host work left the GPU idle 2.0-4.9 ms before each of the two masks' first kernel, and tens of µs between their
small kernels: 4.3-8.7 ms of every micro-batch's start at the 12B shape (call 43's trace,
``python bench/layer_segments.py TRACE --gaps 1000``; the same gaps in Unsloth's compiled LoRA, call 39), against a
~650 ms micro-batch at 48 layers; with the cache a 4-layer micro-batch took 3.7 ms less on another host (call 46,
docs/BENCHMARKS.md). For a training batch without padding the mask depends only on its shape and on what
the mask function computes, so :func:`install` puts a cache in front of transformers' function: the key is the
batch size, the lengths, the offsets, the device and the mask function's structure (its code and the plain values
in its closure, recursively through ``and_masks``/``or_masks``). A mask function that closes over a tensor (padding,
packed sequences, image tokens) or a padded batch goes to transformers' function as before, uncached; so do calls
made while Dynamo traces.

Each mask is classified once, when it is built: its mask function (offsets included) evaluated densely and compared
with causal ∧ window (:func:`trinity_core.train.dense_attention.classify`); :meth:`CachedMasks.pattern_of` tells the
compiled decoder layers which masks are plain, so their attention can run a dense kernel
(:mod:`trinity_core.train.dense_attention`).
"""

from __future__ import annotations

import inspect
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from trinity_core.train import interface_fronts

MAX_ENTRIES = 16
"""Masks kept (least recently used dropped first): a job's batches come in few lengths; generation with a KV cache
would otherwise add one a step."""


class _Uncacheable(Exception):
    """A mask function whose result depends on more than its code and plain values (it closes over a tensor)."""


def _structure(value: Any, depth: int = 0) -> Any:
    """A hashable description of what a mask function computes: for a function, its code and (recursively) its
    closure's and defaults' values; plain values as they are. Raises :class:`_Uncacheable` for anything else."""
    if depth > 16:
        raise _Uncacheable("nested too deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_structure(v, depth + 1) for v in value))
    if isinstance(value, types.FunctionType):
        try:
            cells = tuple(_structure(c.cell_contents, depth + 1) for c in value.__closure__ or ())
        except ValueError as error:  # an empty cell
            raise _Uncacheable("empty closure cell") from error
        return ("function", value.__code__, cells, _structure(value.__defaults__, depth + 1))
    raise _Uncacheable(type(value).__name__)


_KEYED = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "device")
"""``flex_attention_mask``'s arguments that make the key (the first five plain integers)."""


class CachedMasks:
    """``flex_attention_mask`` with a cache in front (:func:`install`); ``hits``/``misses``/``uncached`` count
    the calls."""

    def __init__(self, build: Callable) -> None:
        self.build = build
        self.signature = inspect.signature(build)
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.patterns: dict[int, Any] = {}  # id of a kept mask: its dense_attention.Pattern, if it is plain
        self.lock = threading.Lock()
        self.hits = self.misses = self.uncached = 0

    def key(self, args: tuple, kwargs: dict) -> tuple[tuple | None, inspect.BoundArguments | None]:
        """The cache key of a call (None where its mask must be built, and not kept) and its bound arguments."""
        import torch

        if torch.compiler.is_compiling():
            return None, None
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None, None
        bound.apply_defaults()
        call = bound.arguments
        if any(name not in call for name in _KEYED):  # another transformers: its function as it is
            return None, bound
        padding = call.get("attention_mask")
        if padding is not None and not bool(padding.all()):  # transformers reads it too (one sync either way)
            return None, bound
        if any(isinstance(call[n], torch.Tensor) for n in _KEYED[:5]):
            return None, bound
        params = self.signature.parameters
        try:
            mask = _structure(call["mask_function"])
            rest = tuple((n, _structure(v)) for n, v in call.items() if n not in _KEYED and n != "attention_mask"
                         and params[n].kind is not inspect.Parameter.VAR_KEYWORD)
        except _Uncacheable:
            return None, bound
        return (*(int(call[n]) for n in _KEYED[:5]), str(torch.device(call["device"])), mask, rest), bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key, bound = self.key(args, kwargs)
        if key is None:
            self.uncached += 1
            return self.build(*args, **kwargs)
        with self.lock:
            mask = self.entries.get(key)
            if mask is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return mask
        if "attention_mask" in bound.arguments:  # all ones (checked): the mask without it is the same
            bound.arguments["attention_mask"] = None
        mask = self.build(*bound.args, **bound.kwargs)
        plain = _pattern(mask)
        with self.lock:
            self.misses += 1
            self.entries[key] = mask
            if plain is not None:
                self.patterns[id(mask)] = plain
            while len(self.entries) > MAX_ENTRIES:
                self.patterns.pop(id(self.entries.popitem(last=False)[1]), None)
        return mask

    def pattern_of(self, mask: Any) -> Any:
        """The :class:`~trinity_core.train.dense_attention.Pattern` of a mask this cache built and keeps (causal,
        or causal within a window); None for any other object."""
        return self.patterns.get(id(mask))


def _pattern(mask: Any) -> Any:
    """A built block mask's :class:`~trinity_core.train.dense_attention.Pattern` (None: not plain, or not a
    block mask): its mask function evaluated at every query and key of its first batch entry and every other
    entry compared with it."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    from trinity_core.train.dense_attention import classify

    if not isinstance(mask, BlockMask):
        return None
    q_len, kv_len = mask.seq_lengths
    batch = mask.kv_num_blocks.shape[0]
    if q_len != kv_len:
        return None
    dense = create_mask(mask.mask_mod, batch, None, q_len, kv_len, device=mask.kv_num_blocks.device)
    if batch > 1 and not bool((dense == dense[:1]).all()):
        return None
    return classify(dense[0, 0])


_WHERE = "transformers.masking_utils:ALL_MASK_ATTENTION_FUNCTIONS"


def install() -> CachedMasks | None:
    """Put a :class:`CachedMasks` in front of transformers' flex-attention mask function, for every model of the
    process (its mask interface is one object); once. None where transformers has no such function."""
    return interface_fronts.install(_WHERE, "flex_attention", CachedMasks)


def installed() -> CachedMasks | None:
    """The cache in front of transformers' flex-attention mask function, if :func:`install` put one there."""
    return interface_fronts.installed(_WHERE, "flex_attention", CachedMasks)


def uninstall() -> None:
    """transformers' function back (tests)."""
    interface_fronts.uninstall(_WHERE, "flex_attention", CachedMasks, "build")
