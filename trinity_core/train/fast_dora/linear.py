"""Fast DoRA on 4-bit bases: the weight norm without the out × in matrix, once per optimizer step.

PEFT's DoRA (``peft.tuners.lora.dora.DoraLinearLayer``) dequantises the whole 4-bit weight and
builds ``W + s·B·A`` (out × in) to take its row norms in every forward, again in every
gradient-checkpoint recompute and for every gradient-accumulation micro-batch. With W frozen,

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ

- ``‖W_i‖²`` is computed once, when the layer is patched;
- ``W Aᵀ`` (out × r) is one pass over W: on CUDA a Triton kernel reads the packed NF4 codes
  directly (:mod:`~trinity_core.train.fast_dora.nf4_matmul`) and, with :data:`FUSE_NORMS`, sums the
  three terms in its epilogue; elsewhere W is dequantised a block of rows at a time and multiplied;
- ``A Aᵀ`` is r × r.

The norm is detached (the DoRA paper, section 4.3, and PEFT treat it as a constant in backward),
so it is computed under ``no_grad`` and cached until A or B change. A global ``torch.optim``
post-step hook recomputes every stale norm inside the optimizer step (:func:`refresh_after_step`);
the cache key (that step counter plus A's and B's ``_version``, ``data_ptr`` and dtype) makes any
other change — an in-place edit, a load, a dtype cast — refresh lazily in the next forward.

Cancellation: when ``s·B_i A ≈ -W_i`` the expanded sum loses the small result in fp32 rounding of
the large terms (error ≈ u·√in·(‖W_i‖² + s²·B_iAAᵀB_iᵀ), u = 2⁻²⁴). Rows whose squared norm falls
under ``CANCELLATION_RATIO`` of that scale are recomputed directly from their dequantised rows,
and the sum is clamped at 0 before the square root, so the norm stays within ~1e-4 relative of
the direct one everywhere (~1e-6 on ordinary rows).

Patching swaps the class of each LoRA layer's ``lora_magnitude_vector[adapter]`` module for
:class:`FastDoraLinearLayer` (a subclass that replaces ``forward`` and holds the cache) and its
``lora_variant[adapter]`` for :class:`FastDoraLinearVariant` (same merge/unmerge; its forward is
one :class:`DoraOutput` autograd node). Parameter names, the adapter file, merging (PEFT's
``get_weight_norm``) and GGUF export are unchanged.
``RunOptions(fast_dora=False)`` turns it off (PEFT's own DoRA runs; used by the benchmark).
"""

from __future__ import annotations

import functools
import types
import warnings
import weakref
from collections.abc import Iterator

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant

import trinity_core.train.fast_dora.nf4_matmul as nf4_matmul  # a module reference: tests patch its functions
from trinity_core import nf4
from trinity_core.train.fast_dora.cast_input import base_and_adapter_input

CANCELLATION_RATIO = 0.05
"""Rows with ‖W_i + s·B_iA‖² < this × (‖W_i‖² + s²·B_iAAᵀB_iᵀ) are recomputed directly."""
CHUNK_ELEMENTS = 1 << 24
"""Rows are dequantised at most ~16M elements (64 MB in fp32) at a time; 4× as many in 16 bits on
CUDA, where a whole 12B projection (59M elements) then is one block."""
STACK_ELEMENTS = 1 << 24
"""The batched refresh stacks at most ~16M elements of B (64 MB in fp32) per group."""
USE_NF4_KERNEL = True
"""W Aᵀ straight from the packed NF4 codes where :mod:`nf4_matmul` takes the weights (CUDA and
Triton); False keeps the dequantise-and-multiply path everywhere (the benchmark's baseline)."""

FUSE_NORMS = True
"""With the NF4 kernel: take the norms from its epilogue (:func:`nf4_matmul.nf4_row_norms_or_none`)
rather than W Aᵀ (L, out, r) in fp32 and torch's elementwise sums over it. H200, 48 layers: 8.2 ms per
refresh fused (eager), 12.5 ms not, 48.6 ms for the dequantising path
(bench/results/2026-11-28-h200-norm_refresh-10.jsonl); ``bench/norm_refresh.py`` times them all."""

USE_CUDA_GRAPH = True
"""Replay the refresh's GPU work as one CUDA graph where every stack takes the NF4 kernel
(:func:`_queued`). Eager, the refresh launches about a dozen kernels a stack from Python (10 stacks at
48 layers of the 12B shape), after grouping and checking the layers, and is host-bound: on H200s of
different host speeds, 8.2–11.1 ms per refresh eagerly, 7.4–8.3 ms replayed (docs/BENCHMARKS.md,
"Goal 2 met"). The graph's memory pool stays reserved while training runs
(~0.47 GiB at that size)."""

_optimizer_steps = 0
_hook_handle = None
_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Fast-DoRA layers seen in a forward → (lora_A weight, lora_B weight, scaling, base layer), so
that an optimizer step can refresh every norm it made stale at once (:func:`refresh_after_step`)."""


def _after_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1
    refresh_after_step(optimizer)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process since fast DoRA was first enabled."""
    return _optimizer_steps


@torch.no_grad()
def refresh_after_step(optimizer) -> int:
    """Recompute the norm of every fast-DoRA layer whose A or B ``optimizer`` holds, right after its
    step, batched: projections of one shape are stacked, so a stack's norms are one NF4 kernel
    launch on CUDA (elsewhere one dequantisation and GEMM per projection), and one host sync (the
    cancellation check) serves the whole model, instead of ~20 small kernels and a sync per
    projection (336 projections and ~170 ms per step on the 12B shape). Every stack's GPU work is
    queued before the per-layer bookkeeping runs, and nothing in between waits for the GPU (a stack's
    ‖W_i‖² and scalings stay on the device, :func:`_stack_constants`), so the host's Python overlaps
    the kernels instead of adding to them. Layers this misses (a copy, a reload) still refresh lazily
    in their next forward. On CUDA the second refresh of the same layers is captured as a CUDA graph
    and later ones replay it after one check of the layers' addresses (:func:`_queued`). Returns the
    number refreshed."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    todo = [(dora, *refs) for dora, refs in list(_registry.items()) if id(refs[0]) in held or id(refs[1]) in held]
    key = _graph_key(todo) if _graph_wanted(todo) else None
    replay = _replays.get(optimizer) if key is not None else None
    if replay is not None and replay.key == key and replay.graph:
        replay.graph.replay()  # the same layers at the same addresses: nothing else to check or build
        stacks, (norms, flagged) = replay.stacks, replay.outputs
    else:
        stacks = _stacks(todo)
        norms, flagged = _queued(stacks, key, optimizer)  # GPU work, no sync
    for (group, _), stack_norms in zip(stacks, norms):
        for (dora, a, b, s, base), norm in zip(group, stack_norms.unbind(0)):
            # not nn.Module.__setattr__ (~4 µs, 2 × 336 a step): plain attributes, as it would set them
            dora.__dict__.update(_cached_norm=norm, _cache_key=_cache_key(a, b, s))
    if stacks:  # one host sync; rare: a row nearly cancelled by its adapter, recomputed from its weights
        for (dora, a, b, s, base), any_bad in zip([i for g, _ in stacks for i in g], flagged.tolist()):
            if any_bad:
                dora._cached_norm = dora._factored_norm(a, b, s, base)
    return len(todo)


def _stacks(todo: list) -> list[tuple[list, torch.dtype]]:
    """``todo``'s layers grouped by shape, device and GEMM dtype, at most :data:`STACK_ELEMENTS` of B
    a group: ``[(items, gemm dtype)]``."""
    groups: dict[tuple, list] = {}
    for item in todo:
        dora, a, b, s, base = item
        key = (a.shape, b.shape, a.device, a.dtype, b.dtype, _gemm_dtype(base, a.device))
        if len(groups.setdefault(key, [[]])[-1]) * b.numel() >= STACK_ELEMENTS:
            groups[key].append([])
        groups[key][-1].append(item)
    return [(group, key[-1]) for key, chunks in groups.items() for group in chunks]


class _Replay:
    """The refresh's GPU work captured as one CUDA graph (None until captured, False where capture
    failed), for the layers whose ``key`` it holds (:func:`_graph_key`): their stacks and the graph's
    output tensors."""

    __slots__ = ("key", "graph", "stacks", "outputs")

    def __init__(self, key: tuple, stacks: list):
        self.key, self.graph, self.stacks, self.outputs = key, None, stacks, None


_replays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Optimizer → its captured refresh. Keyed weakly: when a training attempt ends (the OOM ladder's
next rung, say) its optimizer goes, and with it the graph, its memory pool and the layers it holds."""


def _queued(stacks: list, key: tuple | None, optimizer) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every stack's norms (L, out) and one flag a projection, (Σ L,) bool, set where a row must be
    recomputed (see :func:`_stacked_norms`): queued GPU work, no host sync.

    With a ``key`` (:func:`_graph_wanted`) and the NF4 kernel taking every stack, the second refresh
    in a row of the same layers is captured as a CUDA graph, which later refreshes replay
    (:data:`USE_CUDA_GRAPH`, :func:`refresh_after_step`): the graph reads A, B, the packed weights and
    their constants where they are and writes the same output tensors each time, so a layer's cached
    norm is a view that the next replay overwrites (after its optimizer step, when that norm is stale
    anyway). The first refresh of a set runs eagerly: it compiles the kernels and fills the caches
    that capture must not touch (stack constants, address tables)."""
    if key is None or not stacks or not _graphable(stacks):
        return _run(stacks)
    replay = _replays.get(optimizer)
    if replay is None or replay.key != key:
        _replays[optimizer] = _Replay(key, stacks)
        return _run(stacks)
    if replay.graph is None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = _run(stacks)
        except RuntimeError as error:  # capture is an optimisation: stay eager for this set
            replay.graph = False
            warnings.warn(f"fast DoRA: the norm refresh runs without a CUDA graph: {error}", stacklevel=3)
            return _run(stacks)
        replay.graph, replay.stacks, replay.outputs = graph, stacks, outputs
        graph.replay()
        return outputs
    return _run(stacks)  # capture failed for this set


def _run(stacks: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    queued = [_stacked_norms(group, dtype) for group, dtype in stacks]
    if not queued:
        return [], torch.zeros(0, dtype=torch.bool)
    return [n2.clamp_min_(0.0).sqrt_() for n2, _ in queued], torch.cat([bad.any(1) for _, bad in queued])


def _graph_wanted(todo: list) -> bool:
    return bool(todo) and USE_CUDA_GRAPH and USE_NF4_KERNEL and FUSE_NORMS and todo[0][1].device.type == "cuda"


def _graphable(stacks: list) -> bool:
    """Whether every stack's work is the NF4 kernel's on one CUDA device (no host syncs, no
    dequantisation loop): what a CUDA graph can hold."""
    device = stacks[0][0][0][1].device
    return not torch.cuda.is_current_stream_capturing() and all(
        item[1].device == device and nf4_matmul.why_not([item[4].weight for item in group], device) is None
        for group, _ in stacks for item in group[:1])


def _graph_key(todo: list) -> tuple:
    """What a captured refresh depends on, one pass over the layers: each layer, its A's and B's
    storage and dtype, its scaling, its packed weight's storage and its ‖W_i‖² tensor: all a replay
    checks before it is launched."""
    with torch._C.DisableTorchFunctionSubclass():  # Params4bit.data_ptr() is ~2 µs through it
        return tuple((id(dora), a.data_ptr(), a.dtype, b.data_ptr(), b.dtype, s, base.weight.data_ptr(), id(dora._w2))
                     for dora, a, b, s, base in todo)


def _stacked_norms(group: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Factored squared norms ‖W_i + s·B_iA‖² of same-shaped projections ``(dora, A, B, s, base)``,
    (L, out) fp32, and the rows flagged for cancellation (see the module docstring) or not finite,
    (L, out): those are recomputed from their dequantised rows. Queues GPU work only (no host sync)."""
    a = torch.stack([item[1] for item in group])  # (L, r, in)
    b = torch.stack([item[2] for item in group])  # (L, out, r)
    w2, s = _stack_constants(group, a.device)
    fused = nf4_matmul.nf4_row_norms_or_none([item[4].weight for item in group], a, b, w2, s, dtype) \
        if USE_NF4_KERNEL and FUSE_NORMS else None
    if fused is not None:
        n2, size = fused
    else:
        a, b, s = a.float(), b.float(), s.view(-1, 1)
        wa = _weight_times_a([item[4] for item in group], a, b.shape[1], dtype)  # (L, out, r)
        quad = ((b @ (a @ a.mT)) * b).sum(-1)  # B_i (A Aᵀ) B_iᵀ
        size = w2 + s * s * quad
        n2 = size + 2.0 * s * (b * wa.float()).sum(-1)
    # a non-finite sum (the NF4 kernel's fp16 products overflowing, say) is recomputed like a cancelled row
    return n2, (n2 < CANCELLATION_RATIO * size) | ~torch.isfinite(n2)


def _stack_constants(group: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖W_i‖² stacked (L, out), scalings (L,)) of a stack, fp32 on ``device``, kept on its first layer
    while the stack's layers, their ‖W_i‖² tensors and scalings are the same: made every step, the
    scalings' host-to-device copy would wait for the GPU once per stack."""
    for dora, *_, base in group:
        if dora._w2.device != device:
            dora.prepare(base)
    key = (device, tuple((id(item[0]), id(item[0]._w2), item[3]) for item in group))
    kept = group[0][0].__dict__.setdefault("_stack_constants", {})  # by stack size: a layer heads its
    cached = kept.get(len(group))                                   # stack and its own lazy refresh
    if cached is None or cached[0] != key:
        w2s = [item[0]._w2 for item in group]
        scalings = torch.tensor([item[3] for item in group], dtype=torch.float32).to(device)
        cached = kept[len(group)] = (key, torch.stack(w2s), scalings, w2s)  # w2s held: ids not reused
    return cached[1], cached[2]


def _weight_times_a(bases: list, a: torch.Tensor, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``W_l A_lᵀ`` (L, out, r) for same-shaped base layers and stacked ``a`` (L, r, in), W's values
    in ``dtype``: straight from the packed codes where the NF4 kernel takes them (CUDA, Triton, NF4:
    :mod:`~trinity_core.train.fast_dora.nf4_matmul`, ~9× less memory traffic, fp32 result), else
    dequantised a block of rows at a time and multiplied (result in ``dtype``)."""
    if USE_NF4_KERNEL:
        wa = nf4_matmul.nf4_times_stacked_or_none([base.weight for base in bases], a, dtype)
        if wa is not None:
            return wa
    a_t = a.mT.to(dtype)
    wa = torch.empty((a.shape[0], out_features, a.shape[1]), device=a.device, dtype=dtype)
    for i, base in enumerate(bases):
        for start, rows in _weight_rows(base, dtype):
            torch.mm(rows, a_t[i], out=wa[i, start:start + rows.shape[0]])
    return wa


def _cache_key(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> tuple:
    return (_optimizer_steps, float(scaling), lora_A.device, lora_A.dtype, lora_B.dtype,
            lora_A._version, lora_B._version, lora_A.data_ptr(), lora_B.data_ptr())


class FastDoraLinearLayer(DoraLinearLayer):
    """PEFT's ``DoraLinearLayer`` (same ``weight`` = magnitude parameter) with a cached, factored norm."""

    _w2: torch.Tensor  # ‖W_i‖², fp32, shape (out,)
    _cache_key: tuple | None
    _cached_norm: torch.Tensor | None

    def prepare(self, base_layer: torch.nn.Module) -> None:
        """Compute ‖W_i‖² once (fp32) and empty the norm cache."""
        with torch.no_grad():
            self._w2 = torch.cat([(rows * rows).sum(1) for _, rows in _weight_rows(base_layer)])
        self._cache_key = None
        self._cached_norm = None

    def weight_norm(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    base_layer: torch.nn.Module) -> torch.Tensor:
        """‖W_i + s·B_i A‖ for every output row, fp32, detached; cached until A or B change. Inside a
        compiled region of ``train/compiled_layers`` the cache is read as it is: the key compares storage
        addresses, which Dynamo cannot trace, and the region's pre-hook has just checked it
        (:func:`~trinity_core.train.compiled_layers.refresh_norms`). Any other compile (Unsloth's) checks here
        and breaks its graph, as before."""
        checked = getattr(self, "checked_by_region", False) and self._cached_norm is not None
        if checked and torch.compiler.is_compiling():
            return self._cached_norm
        key = _cache_key(lora_A, lora_B, scaling)
        if key != self._cache_key:
            self._cached_norm = self._factored_norm(lora_A, lora_B, scaling, base_layer)
            self._cache_key = key
            _registry[self] = (lora_A, lora_B, float(scaling), base_layer)
        return self._cached_norm

    @torch.no_grad()
    def _factored_norm(self, lora_A, lora_B, scaling, base_layer) -> torch.Tensor:
        """The norm from the factored sum; rows where it lost the result to rounding (a row nearly
        cancelled by its adapter) are recomputed from their dequantised weights (one host sync)."""
        n2, bad = _stacked_norms([(self, lora_A, lora_B, scaling, base_layer)],
                                 _gemm_dtype(base_layer, lora_A.device))
        n2, idx = n2[0], bad[0].nonzero().flatten()
        if idx.numel():
            rows = _select_rows(base_layer, idx)
            n2[idx] = ((rows + scaling * (lora_B.float()[idx] @ lora_A.float())) ** 2).sum(1)
        return n2.clamp_min(0.0).sqrt()

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        """Same arguments and result as PEFT's ``DoraLinearLayer.forward`` (the DoRA term added to
        the base output), without dequantising W or building B·A."""
        weight_norm = self.weight_norm(lora_A.weight, lora_B.weight, scaling, base_layer).to(x.dtype)
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        bias = base_layer.bias
        if base_result is None:  # dropout on: PEFT recomputes the base output on the dropped input
            base_result = base_layer(x)
        if bias is not None:
            base_result = base_result - bias
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def __repr__(self) -> str:
        return "trinity.fast_" + super().__repr__()


class FastDoraLinearVariant(DoraLinearVariant):
    """The DoRA output as one autograd node with as few passes over the activations as LoRA's.

    With g = m/‖W+sBA‖ (per output), PEFT returns ``result + (g-1)·base + g·s·B(Ax)``, i.e.
    ``g ⊙ (base + s·B(Ax))`` (+ bias): :class:`DoraOutput` accumulates ``s·(Ax)Bᵀ`` into the base
    output in place (one GEMM) and scales it by g in one pass, and in backward computes
    ``dz = g ⊙ dy`` and the magnitude gradient ``Σ_t dy·z / ‖W+sBA‖`` in one fused pass (Triton on
    CUDA). That is fewer passes over the (tokens × out) activations than PEFT's own LoRA forward.
    Dropout (which needs the base output of the dropped input) falls back to PEFT's arrangement.
    """

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        dora = module.lora_magnitude_vector[active_adapter]
        if not isinstance(dora, FastDoraLinearLayer) or (
                module.training and not isinstance(module.lora_dropout[active_adapter], torch.nn.Identity)):
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        return dora_output(module, active_adapter, module.lora_A[active_adapter](x), result)


def dora_output(module: torch.nn.Module, name: str, xa: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``g ⊙ (result + s·xa·Bᵀ)`` (+ bias) of a fast-DoRA layer, given its base output ``result`` and
    ``xa`` = A(x): one :class:`DoraOutput` node."""
    dora, lora_B = module.lora_magnitude_vector[name], module.lora_B[name]
    scaling = module.scaling[name]
    base_layer = module.get_base_layer()
    norm = dora.weight_norm(module.lora_A[name].weight, lora_B.weight, scaling, base_layer)
    bias = base_layer.bias
    base = result if bias is None else result - bias
    out, _ = DoraOutput.apply(base, xa, lora_B.weight, dora.weight, norm, float(scaling))
    return out if bias is None else out + bias


def plain_fast_dora(module: torch.nn.Module) -> bool:
    """True when ``module`` is a LoRA layer whose output is exactly ``g ⊙ (Wx + s·B(Ax))``: one active
    fast-DoRA adapter, not merged, no dropout while training, no bias."""
    if getattr(module, "disable_adapters", True) or getattr(module, "merged", True):
        return False
    names = module.active_adapters
    if len(names) != 1 or names[0] not in module.lora_magnitude_vector:
        return False
    name = names[0]
    return (isinstance(module.lora_magnitude_vector[name], FastDoraLinearLayer)
            and isinstance(module.lora_variant.get(name), FastDoraLinearVariant)
            and (not module.training or isinstance(module.lora_dropout[name], torch.nn.Identity))
            and module.get_base_layer().bias is None)


def fast_dora_forward(self: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A fast-DoRA LoRA layer's ``forward`` (installed per instance by :func:`patch_linear_layers`):
    the class's own forward (PEFT's, or Unsloth's replacement of it), except outside autocast when x
    must be cast to the adapter's dtype, where :func:`~trinity_core.train.fast_dora.cast_input.base_and_adapter_input`
    keeps no cast copy. The base output is not cloned: :class:`DoraOutput` writes into it in place (as
    Unsloth's forward allows)."""
    if (args or kwargs or torch.is_autocast_enabled(x.device.type) or not plain_fast_dora(self)
            or x.dtype == self.lora_A[self.active_adapters[0]].weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    result, xa = base_and_adapter_input(self, name, x)
    return dora_output(self, name, xa, result)


class DoraOutput(torch.autograd.Function):
    """``y = g ⊙ (base + s·xa·Bᵀ)`` with ``g = m / norm`` (norm detached), in ``base``'s dtype.

    Inputs: ``base`` (…, out) the base layer's output without bias, ``xa`` (…, r) = A(x), ``B``
    (out, r), ``m`` (out,), ``norm`` (out,) fp32. ``z = base + s·xa·Bᵀ`` is accumulated into
    ``base`` in place (one GEMM, no copy; PEFT's ``result`` is a fresh tensor nobody else reads),
    then ``y = z + z ⊙ (g-1)`` (one vectorised pass; ``g-1`` keeps its precision in 16 bits where
    ``g`` ≈ 1 would not). Returns ``(y, base)``: the second output is ``base`` marked dirty, for
    autograd's bookkeeping, or None when it could not be updated in place (a view).
    Gradients: d base = g ⊙ dy; d xa = s·(g ⊙ dy)·B; d B = s·(g ⊙ dy)ᵀ·xa; d m = Σ_t dy ⊙ z / norm,
    the last two accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, base, xa, weight_b, magnitude, norm, scaling):
        ctx.set_materialize_grads(False)
        dtype, out_features = base.dtype, base.shape[-1]
        xa2 = xa.reshape(-1, xa.shape[-1]).to(dtype)
        b = weight_b.to(dtype)
        if base.is_contiguous() and base._base is None:
            z = base.view(-1, out_features).addmm_(xa2, b.t(), alpha=scaling)
            ctx.mark_dirty(base)
            dirty = base
        else:
            z = torch.addmm(base.reshape(-1, out_features), xa2, b.t(), alpha=scaling)
            dirty = None
        g = magnitude.detach().to(_acc_dtype(magnitude)) / norm
        y = torch.addcmul(z, z, (g - 1).to(dtype))
        ctx.save_for_backward(base if dirty is not None else z, xa2, b, g, norm)
        ctx.scaling = scaling
        ctx.meta = (base.shape, xa.shape, xa.dtype, weight_b.dtype, magnitude.dtype)
        return y.view(base.shape), dirty

    @staticmethod
    def backward(ctx, dy, _dirty_grad):
        if dy is None:
            return None, None, None, None, None, None
        z, xa2, b, g, norm = ctx.saved_tensors
        base_shape, xa_shape, xa_dtype, b_dtype, m_dtype = ctx.meta
        s = ctx.scaling
        dz, dyz = scale_and_reduce(dy.reshape(-1, base_shape[-1]), z.reshape(-1, base_shape[-1]), g)
        need_base, need_xa, need_b, need_m = ctx.needs_input_grad[:4]
        d_xa = torch.mm(dz, b * s).reshape(xa_shape).to(xa_dtype) if need_xa else None
        d_b = torch.mm(dz.t(), xa2).mul_(s).to(b_dtype) if need_b else None
        d_m = (dyz / norm).to(m_dtype) if need_m else None
        return (dz.reshape(base_shape) if need_base else None), d_xa, d_b, d_m, None, None


class LoraSum(torch.autograd.Function):
    """``z = base + s·xa·Bᵀ`` accumulated into ``base`` in place (one GEMM, no copy), in base's dtype:
    the DoRA output before its gain, for :mod:`trinity_core.train.fast_dora.mlp`. Same inputs and gradients
    as :class:`DoraOutput` with g = 1 (d base = dz, d xa = s·dz·B, d B = s·dzᵀ·xa)."""

    @staticmethod
    def forward(ctx, base, xa, weight_b, scaling):
        ctx.set_materialize_grads(False)
        out_features = base.shape[-1]
        xa2 = xa.reshape(-1, xa.shape[-1]).to(base.dtype)
        b = weight_b.to(base.dtype)
        ctx.save_for_backward(xa2, b)
        ctx.scaling, ctx.meta = scaling, (xa.shape, xa.dtype, weight_b.dtype)
        if base.is_contiguous() and base._base is None:
            base.view(-1, out_features).addmm_(xa2, b.t(), alpha=scaling)
            ctx.mark_dirty(base)
            return base
        return torch.addmm(base.reshape(-1, out_features), xa2, b.t(), alpha=scaling).view(base.shape)

    @staticmethod
    def backward(ctx, dz):
        if dz is None:
            return None, None, None, None
        xa2, b = ctx.saved_tensors
        xa_shape, xa_dtype, b_dtype = ctx.meta
        dz2 = dz.reshape(-1, dz.shape[-1])
        s = ctx.scaling
        d_xa = torch.mm(dz2, b * s).reshape(xa_shape).to(xa_dtype) if ctx.needs_input_grad[1] else None
        d_b = torch.mm(dz2.t(), xa2).mul_(s).to(b_dtype) if ctx.needs_input_grad[2] else None
        return dz, d_xa, d_b, None


def scale_and_reduce(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g ⊙ dy, Σ_t dy ⊙ z)`` for (T, out) ``dy`` and ``z``: one pass with Triton on CUDA, fp32 sums.
    Inside a compiled region (``train/compiled_layers``) the same arithmetic in torch operations, which inductor
    fuses into the region's kernels (with :data:`REGION_CUSTOM_OPS`, the Triton kernel as the custom op
    ``trinity::scale_and_reduce`` instead: an opaque node launched through the op's Python dispatch, the
    arrangement until 2026-11-29, kept for the A/B); eagerly the kernel called directly."""
    if torch.compiler.is_compiling():
        if REGION_CUSTOM_OPS:
            return torch.ops.trinity.scale_and_reduce(dy, z, g)
        acc = _acc_dtype(dy)
        return (dy.to(acc) * g).to(dy.dtype), (dy.to(acc) * z.to(acc)).sum(0)
    return _scale_and_reduce(dy, z, g)


REGION_CUSTOM_OPS = False
"""Inside a compiled region: fast DoRA's Triton kernels as custom ops (True: ``bench/gpu_bench.py --region-opaque``,
the A/B), or their arithmetic in torch operations that inductor fuses with the region's other elementwise work
(False: the default; the regions' graphs then hold no custom op, ``tests/core/test_compiled_layers.py``)."""


@torch.library.custom_op("trinity::scale_and_reduce", mutates_args=())
def _scale_and_reduce_op(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _scale_and_reduce(dy, z, g)


@_scale_and_reduce_op.register_fake
def _(dy, z, g):
    return torch.empty_like(dy, memory_format=torch.contiguous_format), dy.new_empty(dy.shape[-1:],
                                                                                    dtype=_acc_dtype(dy))


def _scale_and_reduce(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if dy.is_cuda and _triton_kernel() is not None:
        return _scale_and_reduce_triton(dy.contiguous(), z.contiguous(), g)
    dz = torch.mul(dy, g, out=torch.empty_like(dy, memory_format=torch.contiguous_format))
    acc = _acc_dtype(dy)
    return dz, torch.einsum("tn,tn->n", dy.to(acc), z.to(acc))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit tensors, fp64 stays fp64 (the gradient check)."""
    return torch.promote_types(t.dtype, torch.float32)


@functools.cache
def _triton_kernel():
    """The Triton kernel for :func:`scale_and_reduce`, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(dy_ptr, z_ptr, g_ptr, dz_ptr, part_ptr, T, N, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_N: tl.constexpr):
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in range(0, ROWS, BLOCK_T):
            rows = (pid_t * ROWS + t + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask = (rows[:, None] < T) & cmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dz_ptr + offs, (dy * g[None, :]).to(dz_ptr.dtype.element_ty), mask=mask)
            acc += tl.sum(dy * z, axis=0)
        tl.store(part_ptr + pid_t * N + cols, acc, mask=cmask)

    return kernel


def _scale_and_reduce_triton(dy, z, g, rows=256, block_t=32, block_n=128):
    import triton

    t, n = dy.shape
    dz = torch.empty_like(dy)
    parts = torch.empty((triton.cdiv(t, rows), n), device=dy.device, dtype=torch.float32)
    _triton_kernel()[(parts.shape[0], triton.cdiv(n, block_n))](
        dy, z, g.contiguous(), dz, parts, t, n, ROWS=rows, BLOCK_T=block_t, BLOCK_N=block_n)
    return dz, parts.sum(0)


def patch_linear_layers(model: torch.nn.Module) -> int:
    """Swap every PEFT DoRA linear layer of ``model`` for :class:`FastDoraLinearLayer` and install
    the optimizer post-step hook; the number of layers patched. ``fast_dora.enable_fast_dora``
    calls it, then patches the gated MLPs."""
    global _hook_handle
    patched = 0
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(magnitudes, torch.nn.ModuleDict) or getattr(module, "fan_in_fan_out", False):
            continue
        for name, dora in magnitudes.items():
            if type(dora) is DoraLinearLayer:  # not the Embedding/Conv variants, not already patched
                dora.__class__ = FastDoraLinearLayer
                dora.prepare(module.get_base_layer())
                module.lora_variant[name] = FastDoraLinearVariant()
                if "forward" not in module.__dict__:
                    module.forward = types.MethodType(fast_dora_forward, module)
                patched += 1
    if patched and _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook_handle = register_optimizer_step_post_hook(_after_step)
    return patched


# --------------------------------------------------------------------------- weight rows


def _gemm_dtype(base_layer: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype W Aᵀ is computed in: the layer's 16-bit compute dtype on CUDA (PEFT's own DoRA
    takes its norm from W in that dtype too; the GEMM accumulates in fp32), fp32 elsewhere. In fp32
    on an H100 the refresh of 336 projections took 162 ms, ~2.7% of a 4-micro-batch step."""
    state = getattr(base_layer.weight, "quant_state", None)
    dtype = state.dtype if state is not None else base_layer.weight.dtype
    return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else torch.float32


def _weight_rows(base_layer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, rows)`` of the layer's weight in ``dtype``, a block of rows at a time.

    For a bitsandbytes ``Params4bit`` only that block is dequantised (rows are cut on quantisation
    block boundaries of the row-major packed data, ``nf4.row_blocks``), so no out × in tensor is
    ever held.
    """
    weight = base_layer.weight
    chunk = CHUNK_ELEMENTS * (4 if dtype.itemsize == 2 and weight.is_cuda else 1)
    state = getattr(weight, "quant_state", None)
    if state is None:  # a plain nn.Linear
        out_features, in_features = weight.shape
        step = max(1, chunk // in_features)
        for start in range(0, out_features, step):
            yield start, weight[start:start + step].to(dtype)
        return
    if weight.__class__.__name__ != "Params4bit" or getattr(state, "packing_format_for_cpu", False):
        from peft.utils.integrations import dequantize_module_weight

        yield 0, dequantize_module_weight(base_layer).to(dtype)
        return
    yield from nf4.row_blocks(weight.data, state, max(1, chunk // state.shape[1]), dtype)


def _select_rows(base_layer: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The fp32 weight rows ``idx`` (sorted), dequantising only the blocks that hold them."""
    wanted = idx.tolist()
    found: dict[int, torch.Tensor] = {}
    for start, rows in _weight_rows(base_layer):
        for i in wanted:
            if start <= i < start + rows.shape[0]:
                found[i] = rows[i - start]
        if len(found) == len(wanted):
            break
    return torch.stack([found[i] for i in wanted])


def linear_norm_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row the direct way (float64), for tests and benchmarks."""
    w = weight.double() + scaling * (lora_B.double() @ lora_A.double())
    return torch.linalg.vector_norm(w, dim=1)


__all__ = ["DoraOutput", "LoraSum", "FastDoraLinearLayer", "FastDoraLinearVariant", "scale_and_reduce",
           "patch_linear_layers", "optimizer_steps", "refresh_after_step", "linear_norm_reference",
           "CANCELLATION_RATIO"]
