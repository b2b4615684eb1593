"""Decoder layers compiled as one region each, fast DoRA inside, for the bf16 path with Unsloth's compile off.

Unsloth's compile mode compiles each transformer block as one region: the Python of transformers' layer,
PEFT's LoRA forwards and bitsandbytes' 4-bit matmul runs once, at tracing, and the step replays graphs. With
fast DoRA that compile fails (the norm cache's address check is not traceable), so the Unsloth backend turns
the mode off, and the step is host-bound: at the 12B shape on an H200 the GPU idles ~30% of the step while
Python launches kernels (torch.profiler kernel totals against wall time, docs/BENCHMARKS.md, "Goal 1").

:func:`compile_decoder_layers` gives each decoder layer a forward compiled by ``torch.compile`` (dynamic
shapes, so one graph serves every sequence length of a layer kind) for training calls, and a forward
pre-hook, :func:`refresh_norms`, that brings its fast-DoRA norm caches up to date eagerly before the region
runs; inside it ``FastDoraLinearLayer.weight_norm`` reads the cache (a graph input, so a refreshed norm is
used without recompiling); fast DoRA's output arithmetic is traced as torch operations that inductor fuses
(``fast_dora.linear.scale_and_reduce``), its gated activation runs its Triton kernels as triton ops that inductor
launches (``fast_dora.mlp.GatedActInGraph``), a LoRA job's gated MLP the class formula (:func:`gated_mlp_forward`),
and each frozen NF4 projection is ``x Wᵀ`` with W from the ``trinity::nf4_dequantize`` kernel
(:func:`nf4_base_forward`), so the compiled graphs call no op through its Python dispatch; Python floats (eps, LoRA scaling) are traced as constants
(:func:`~trinity_core.train.compiled_kernels.floats_as_constants`). Evaluation and generation calls run the layer's
own forward.

Guards. Before each call of a compiled function Dynamo checks that what the graph specialised on still holds: at
the 12B shape ~500 µs a call on the host, ~200 ms an optimizer step at 48 layers (call 16's profile), most of
it on the layer's modules (on the tiny model, 488.6 µs a call against 120.8 without those: bench/guard_lookup.py,
docs/BENCHMARKS.md). The layers are instead grouped by
:func:`layer_kind` (each submodule's class and plain attributes, each tensor's shape and dtype; Gemma-3 has two
kinds, sliding and global attention), each kind gets its own copy of the layer's forward (Dynamo keeps a code
object's graphs on the code object, so a copy's graphs serve only its kind of this model's layers), compiled with
Dynamo's guards on modules dropped (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``; the guards on the
call's inputs and on globals stay). What those guards would have caught at run time and can change while
training, :func:`compiled_layer_forward` checks itself: the layer in training mode, the adapters as compiled (not
disabled, merged or switched). The copies compile ``fullgraph``: with a graph break Dynamo would compile the
nested frame on its shared code object with the reduced guards, so a graph break makes the model's layers fall
back to one compile of their own forward with every guard (:data:`MODULE_GUARDS`), whatever Dynamo cannot trace
running eagerly between graphs rather than failing the job.

Whole blocks of tokens (:data:`WHOLE_BLOCKS`, on). With dynamic shapes inductor cannot know that the sequence length
is a multiple of the attention's 128-token blocks, so its flex-attention templates load every Q, K and V tile with
bounds checks (``IS_DIVISIBLE=False``): at the 12B shape the attention backward ran 1872 µs a launch in Trinity's
LoRA layers against 1560 in fast DoRA's, whose graph had specialised on the length (H200, calls 39 and 41,
docs/BENCHMARKS.md). A call whose length is a multiple of :data:`TOKEN_BLOCK` (a packed job's every batch, the
benchmark's 4096) runs a second compile of its kind's forward that states it twice: ``torch._check`` (a guard, and on
torch 2.13 a fact inductor's flex lowering reads; on the GPU image's torch 2.11 it was not enough, call 43) and
``kernel_options={"IS_DIVISIBLE": True}``, which transformers' flex attention passes to ``flex_attention`` and its
lowering keeps (it only ``setdefault``s the option). Call 44 (H200, 48 layers): all 16 flex templates of the first
row read ``IS_DIVISIBLE: True``, and the LoRA layers ran 6231.1 tok/s with it against 6143.2 without (+1.4%, same
run). The whole-block compile serves one length a kind, the first it sees (a packed job's every batch is
``max_seq_length`` tokens); other lengths run the general compile, which is not recompiled by length: at most two
graphs a kind. Fast DoRA's whole-block graph specialises on its length (call 46, 4 layers of the 12B shape: 2048
tokens after 4096 compiled again for 88 s, 3000 then 1000 tokens compiled once, the general graph), so a second
whole-block length would mean a compile of that size for a ~1% faster step.

Dense attention. A call whose ``attention_mask`` is a block mask that :mod:`~trinity_core.train.block_masks` built
and found plain (causal, or causal within a window) gets ``dense_attention=<its pattern>`` among its keywords, looked
up here outside the region; where :mod:`~trinity_core.train.dense_attention` is installed a global layer's attention
then runs SDPA's cuDNN kernel instead of flex attention's templates (a sliding layer's FlashAttention-2 only with its
``SLIDING``; that module's docstring).

H200, 12B shape at 48 layers, the recipe's settings, one run (docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (late)",
call 22): 5900 tok/s against 6090 for Unsloth's compiled LoRA (0.969×); peak allocated 11.03 GiB (each layer's
dequantised projections are kept for its backward; counted by ``train/memory.py``). Dropping the module guards
measured no gain there (call 20: 5883 against 5887 tok/s with every guard; that GPU was not waiting on the host).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, Unsupported

from trinity_core.train import block_masks, dense_attention, nf4_dequant
from trinity_core.train.compiled_kernels import floats_as_constants
from trinity_core.train.fast_dora import lora_in_gemm
from trinity_core.train.fast_dora.linear import FastDoraLinearLayer, fast_dora_forward
from trinity_core.train.fast_dora.mlp import GATED_MLP_CLASSES

LAYER_CLASSES = ("Gemma3DecoderLayer",)
"""Decoder layers compiled (by class name): the ones the recipe's model has and the tests exercise."""

MODULE_GUARDS = False
"""True: the layers share one compile of their own forward with all of Dynamo's guards (as until 2026-11-29, and
the fallback after a graph break); for the A/B (``bench/gpu_bench.py --module-guards``)."""

MAX_KINDS = 8
"""More kinds than this (a model whose layers differ in some attribute :func:`layer_kind` does not know to leave
out) would mean as many compiles: the layers then share one compile with every guard instead, and a warning says so."""

WHOLE_BLOCKS = True
"""True: a training call whose sequence length is a multiple of :data:`TOKEN_BLOCK` runs its kind's compile for whole
blocks (module docstring, "Whole blocks of tokens"). On since call 44 (+1.4% for the LoRA layers at 48 layers, its
flex templates without bounds checks); False for the A/B (``bench/gpu_bench.py --no-whole-blocks``)."""

TOKEN_BLOCK = 128
"""Flex attention's block size, the unit of its bounds checks: a length that is a multiple of it fills whole blocks."""

_NOT_TRACED = frozenset({"layer_idx", "_cache_key", "_stack_constants", "_dynamo_static_input_type"})
"""Attributes that differ from layer to layer but that a training call's graph does not read: ``layer_idx`` only
indexes a KV cache (the region's guard that ``past_key_values`` is None stays); ``_cache_key`` and
``_stack_constants`` are fast DoRA's norm-cache bookkeeping, used eagerly (:func:`refresh_norms`, the refresh after
an optimizer step); Dynamo marks the parameters it has seen with ``_dynamo_static_input_type``."""


def _describe(value: Any, depth: int = 0) -> Any:
    """A hashable description of ``value`` for :func:`layer_kind`: plain values as they are, tensors by their
    metadata (and a 4-bit weight's quantisation state), modules by class (each is described on its own), functions
    by name, other objects by class and attributes (a few levels deep)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, torch.Tensor):
        extra = _describe(vars(value), depth + 1) if type(value) is not torch.Tensor and depth < 4 else ()
        return ("tensor", type(value).__qualname__, tuple(value.shape), value.stride(), value.dtype,
                value.device.type, value.requires_grad, extra)
    if isinstance(value, nn.Module):
        return ("module", type(value).__qualname__)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return tuple((k if isinstance(k, str) else "#", _describe(v, depth + 1)) for k, v in value.items()
                     if k not in _NOT_TRACED)
    if isinstance(value, functools.partial):
        return ("partial", _describe(value.func, depth + 1), _describe(value.args, depth + 1))
    if callable(value):
        func = getattr(value, "__func__", value)
        return ("callable", getattr(func, "__module__", None), getattr(func, "__qualname__", type(func).__qualname__))
    if hasattr(value, "__dict__") and depth < 4:
        return (type(value).__qualname__, _describe(vars(value), depth + 1))
    return type(value).__qualname__


def layer_kind(layer: nn.Module) -> tuple:
    """What a decoder layer's compiled graph may specialise on besides its call's inputs, as one hashable value:
    every submodule's name, class and attributes (:func:`_describe`; the attributes in :data:`_NOT_TRACED`
    left out). Layers of one kind can share a compiled graph without Dynamo's guards on their modules."""
    return tuple((name, type(m).__qualname__, _describe({k: v for k, v in vars(m).items()
                                                         if not k.startswith("_trinity")}))
                 for name, m in layer.named_modules())


class _Kind(tuple):
    """A :func:`layer_kind` that hashes once: the regions look their compiles up by it on every layer call (three
    lookups with whole blocks), and a plain tuple is hashed again at each: 23.3-23.9 µs a lookup against 0.07 on
    this machine's CPU; with this and without the refresh hook on a LoRA job's layers a layer call's host time was
    94-149 µs shorter in three runs (``bench/region_host_cost.py``, bench/results/2026-11-30-cpu-region_host_cost.txt;
    two calls a layer a micro-batch under gradient checkpointing: ~10 ms a micro-batch at 48 layers)."""

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            self._hash = tuple.__hash__(self)
            return self._hash


def _adapter_state(layer: nn.Module) -> tuple:
    """The LoRA state a compiled region assumes, which Dynamo's dropped module guards would have checked: for each
    LoRA module of ``layer``, whether its adapters are disabled, which are merged, which are active."""
    return tuple((m._disable_adapters, tuple(m.merged_adapters), str(m._active_adapter))
                 for m in layer._trinity_lora_modules)


def _forward_copy(cls: type) -> types.FunctionType:
    """``cls.forward`` as a new function with its own code object, so Dynamo's cache of its graphs (kept on the
    code object) serves only the layers it is compiled for: not another kind, not another model (the OOM ladder's
    next rung reloads the model, with another rank or targets)."""
    f = cls.forward
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = f.__kwdefaults__, f.__qualname__
    copy.__dict__.update(f.__dict__)
    return copy


def _in_whole_blocks(forward: types.FunctionType) -> types.FunctionType:
    """``forward`` behind ``torch._check(tokens % TOKEN_BLOCK == 0)`` on the hidden states' sequence dimension and
    with ``kernel_options={"IS_DIVISIBLE": True}`` for its attention, as a function with its own code object
    (:func:`_forward_copy`'s reason). Called only with such lengths (:func:`_block_length`); Dynamo installs the
    check as a guard, so the graph is never run with a length it does not fit."""

    def whole_blocks_forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        torch._check(hidden.shape[-2] % TOKEN_BLOCK == 0)
        kwargs["kernel_options"] = {**(kwargs.get("kernel_options") or {}), "IS_DIVISIBLE": True}
        return forward(self, *args, **kwargs)

    f = whole_blocks_forward
    return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)


def _block_length(args: tuple, kwargs: dict) -> int | None:
    """A layer call's sequence length (its hidden states' second-to-last dimension) if it is a multiple of
    :data:`TOKEN_BLOCK` tokens, else None."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 and hidden.shape[-2] % TOKEN_BLOCK == 0:
        return int(hidden.shape[-2])
    return None


def _plain_pattern(mask: Any) -> dense_attention.Pattern | None:
    """The mask's dense-attention pattern, where both :mod:`~trinity_core.train.block_masks`' cache (which built and
    classified it) and :mod:`~trinity_core.train.dense_attention` are installed; else None."""
    if mask is None or dense_attention.installed() is None:
        return None
    cache = block_masks.installed()
    return None if cache is None else cache.pattern_of(mask)


def refresh_norms(layer: nn.Module, args=None, kwargs=None) -> None:
    """Forward pre-hook: every fast-DoRA norm cache in ``layer`` checked (and recomputed if A or B changed),
    eagerly, as the layer's uncompiled forward would on its way."""
    for module in layer._trinity_lora_modules:
        for name in module.active_adapters:
            dora = module.lora_magnitude_vector[name] if name in module.lora_magnitude_vector else None
            if isinstance(dora, FastDoraLinearLayer):
                dora.weight_norm(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name],
                                 module.get_base_layer())


def nf4_base_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A frozen bitsandbytes NF4 layer's forward (installed per instance on those inside a compiled layer): while
    Dynamo traces, ``x Wᵀ`` with W from :func:`trinity_core.train.nf4_dequant.dequantize` (a Triton kernel that
    inductor launches from its generated code) instead of bitsandbytes' opaque ``gemm_4bit``, which the compiled
    graph calls through its Python dispatch (~190 µs of host time a call at the 12B shape). The partitioner keeps
    W for the backward's ``dY W`` (one layer's projections at a time: +0.64 GiB peak at the 12B shape). Otherwise
    (eagerly, or a layer :func:`~trinity_core.train.nf4_dequant.covers` does not cover) the layer's own forward."""
    if torch.compiler.is_compiling() and nf4_dequant.covers(self, x.dtype):
        return torch.nn.functional.linear(x, nf4_dequant.dequantize(self.weight, x.dtype))
    return type(self).forward(self, x)


def gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP's forward (installed per instance on those inside a compiled layer that have none of their own:
    a LoRA job's, fast DoRA's have :func:`~trinity_core.train.fast_dora.mlp.gated_dora_forward`): while Dynamo
    traces, ``down(act(gate(x)) ⊙ up(x))``, the formula of every class in
    :data:`~trinity_core.train.fast_dora.mlp.GATED_MLP_CLASSES`, for inductor to fuse. Unsloth replaces Gemma-3's
    MLP forward by one under ``torch.compiler.disable``, which broke each region's graph (6 breaks at 48 layers,
    call 18, docs/BENCHMARKS.md). Otherwise the class's own forward."""
    if torch.compiler.is_compiling():
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return type(self).forward(self, x)


def _bnb_linear4bit() -> type:
    """bitsandbytes' 4-bit linear layer (PEFT's LoRA wrapper of it has the same class name)."""
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


class RegionState:
    """Shared by one model's compiled layers: their compiled forwards, one a kind with the module guards dropped,
    or one a class with every guard (:data:`MODULE_GUARDS`, too many kinds, or after a graph break), and why
    their compile failed, if it did (then they all run eagerly)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.failed: str | None = None
        self.guarded = MODULE_GUARDS
        self.kinds: dict[tuple, Callable] = {}
        self.classes: dict[type, Callable] = {}
        self.whole_blocks: dict[Any, Callable] = {}  # kind or class: its compile for whole blocks of tokens
        self.block_length: dict[Any, int] = {}  # kind or class: the one length its whole-block compile serves
        self.dense_calls = 0  # layer calls given a plain mask's dense-attention pattern

    def add(self, layer: nn.Module) -> None:
        """Give ``layer`` its kind (compiling a forward for a new kind)."""
        layer._trinity_kind = None if self.guarded else _Kind(layer_kind(layer))
        if self.guarded or layer._trinity_kind in self.kinds:
            return
        if len(self.kinds) == MAX_KINDS:
            warnings.warn(f"compiled decoder layers: more than {MAX_KINDS} kinds of layer; they share one compile "
                          "with all of Dynamo's guards", stacklevel=3)
            self.guarded = True
            return
        self.kinds[layer._trinity_kind] = self._compile_kind(_forward_copy(type(layer)))

    def _compile_kind(self, forward: types.FunctionType) -> Callable:
        return floats_as_constants(torch.compile(
            forward, dynamic=True, fullgraph=True, backend=self.backend,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}))

    def _compile_class(self, forward: types.FunctionType) -> Callable:
        return floats_as_constants(torch.compile(forward, dynamic=True, backend=self.backend))

    def forward_of(self, layer: nn.Module, block_length: int | None = None) -> Callable:
        """The compiled forward ``layer`` runs: its kind's, or its class's with every guard; with ``block_length``
        (the call's length, a multiple of :data:`TOKEN_BLOCK`) the compile of it that knows so, made on first use,
        for the first such length only (module docstring: fast DoRA's compiles it again for each)."""
        if not self.guarded:
            key, compile_ = layer._trinity_kind, self._compile_kind
            general = self.kinds
        else:
            key, compile_ = type(layer), self._compile_class
            if key not in self.classes:
                self.classes[key] = compile_(_forward_copy(key))
            general = self.classes
        if block_length is None or self.block_length.setdefault(key, block_length) != block_length:
            return general[key]
        if key not in self.whole_blocks:  # the wrapper has its own code object; the copy it calls is inlined
            self.whole_blocks[key] = compile_(_in_whole_blocks(_forward_copy(type(layer))))
        return self.whole_blocks[key]


def compiled_layer_forward(self: nn.Module, *args, **kwargs):
    """The layer's forward through its compiled region while training, its own forward otherwise.

    A layer runs its own forward too while its adapters are not as compiled (disabled, merged, another active).
    The regions are an optimisation: if compiling one fails (inductor or Dynamo raising, on a model or GPU the
    tests have not seen), every layer of the model runs its own forward from then on and a warning says why; the
    step goes on, the layer's forward run again eagerly (it changes no state that a partly run region could have
    left). A CUDA OOM while compiling is raised as such, for the OOM ladder; errors while a compiled graph runs are
    not caught."""
    state: RegionState = self._trinity_region_state
    if self.training and state.failed is None and _adapter_state(self) == self._trinity_adapters:
        try:
            block_length = _block_length(args, kwargs) if WHOLE_BLOCKS else None
            plain = _plain_pattern(kwargs.get("attention_mask"))
            if plain is not None:
                kwargs = {**kwargs, dense_attention.KEYWORD: plain}
                state.dense_calls += 1
            return state.forward_of(self, block_length)(self, *args, **kwargs)
        except Unsupported as error:  # a graph break under fullgraph: every guard from now on (module docstring)
            if state.guarded:
                raise
            state.guarded = True
            first_line = (str(error).splitlines() or [""])[0]
            warnings.warn(f"compiled decoder layers: a graph break ({first_line[:200]}); the layers share one "
                          "compile with all of Dynamo's guards", stacklevel=2)
            return compiled_layer_forward(self, *args, **kwargs)
        except (BackendCompilerFailed, InternalTorchDynamoError) as error:
            cause = getattr(error, "inner_exception", None) or error.__cause__
            if isinstance(cause, torch.OutOfMemoryError):
                raise cause from error
            first_line = (str(cause or error).splitlines() or [""])[0]
            state.failed = f"{type(cause or error).__name__}: {first_line[:300]}"
            warnings.warn(f"compiled decoder layers: compiling failed, the layers run eagerly ({state.failed})",
                          stacklevel=2)
    return type(self).forward(self, *args, **kwargs)


def compile_decoder_layers(model: nn.Module, backend: Any = "inductor") -> int:
    """Compile every decoder layer of ``model`` (:data:`LAYER_CLASSES`) that has no forward of its own yet, as
    the module docstring says. Returns how many. ``backend`` (``torch.compile``'s): "inductor" on a GPU;
    "aot_eager" or a counting backend in the tests. The layers' frozen NF4 projections get
    :func:`nf4_base_forward`, their gated MLPs without a forward of their own :func:`gated_mlp_forward`."""
    compiled, state = 0, RegionState(backend)
    for layer in model.modules():
        if type(layer).__name__ not in LAYER_CLASSES or "forward" in layer.__dict__:
            continue
        for base in layer.modules():
            if isinstance(base, _bnb_linear4bit()) and "forward" not in base.__dict__:
                base.forward = types.MethodType(nf4_base_forward, base)
            elif type(base).__name__ in GATED_MLP_CLASSES and "forward" not in base.__dict__:
                base.forward = types.MethodType(gated_mlp_forward, base)
        named = [(n, m) for n, m in layer.named_modules() if hasattr(m, "lora_magnitude_vector")]
        layer._trinity_lora_modules = [m for _, m in named]
        for name, module in named:
            module._trinity_projection = name.rsplit(".", 1)[-1]  # lora_in_gemm's PROJECTIONS select by it
            for dora in module.lora_magnitude_vector.values():
                if isinstance(dora, FastDoraLinearLayer):
                    dora.checked_by_region = True  # weight_norm may read its cache as it is inside the region
            if getattr(module.__dict__.get("forward"), "__func__", None) is fast_dora_forward:
                module.forward = types.MethodType(lora_in_gemm.region_forward, module)  # the adapter in the GEMM
            elif "forward" not in module.__dict__ and not module.lora_magnitude_vector:  # a plain LoRA layer
                module.forward = types.MethodType(lora_in_gemm.region_lora_forward, module)
        state.add(layer)
        layer._trinity_adapters = _adapter_state(layer)
        layer._trinity_region_state = state
        layer.forward = types.MethodType(compiled_layer_forward, layer)
        if any(isinstance(dora, FastDoraLinearLayer) for m in layer._trinity_lora_modules
               for dora in m.lora_magnitude_vector.values()):  # a LoRA job's layers: nothing to refresh
            layer.register_forward_pre_hook(refresh_norms, with_kwargs=True)
        compiled += 1
    return compiled


__all__ = ["LAYER_CLASSES", "MAX_KINDS", "MODULE_GUARDS", "RegionState", "compile_decoder_layers",
           "compiled_layer_forward", "gated_mlp_forward", "layer_kind", "nf4_base_forward",
           "refresh_norms"]
