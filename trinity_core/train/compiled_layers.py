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
used without recompiling); fast DoRA's elementwise arithmetic is traced as torch operations that inductor fuses
(``fast_dora.linear.scale_and_reduce``, ``fast_dora.mlp.GatedActInGraph``), and each frozen NF4 projection is
``x Wᵀ`` with W from the ``trinity::nf4_dequantize`` kernel (:func:`nf4_base_forward`), so the compiled graphs
call no op through its Python dispatch; Python floats (eps, LoRA scaling) are traced as constants
(:func:`~trinity_core.train.compiled_kernels.floats_as_constants`). Evaluation and generation calls run the layer's
own forward. Not ``fullgraph``: whatever Dynamo cannot trace runs eagerly between graphs rather than failing the job.

H200, 12B shape at 48 layers, the recipe's settings, one run (docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (night)"):
5815 tok/s against 6091 for Unsloth's compiled LoRA (0.955×); peak allocated 11.33 GiB against 10.69 with
bitsandbytes' op in the regions (each layer's dequantised projections are kept for its backward; counted by
``train/memory.py``).
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError

from trinity_core.train import nf4_dequant
from trinity_core.train.compiled_kernels import floats_as_constants
from trinity_core.train.fast_dora.linear import FastDoraLinearLayer

LAYER_CLASSES = ("Gemma3DecoderLayer",)
"""Decoder layers compiled (by class name): the ones the recipe's model has and the tests exercise."""


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


def _bnb_linear4bit() -> type:
    """bitsandbytes' 4-bit linear layer (PEFT's LoRA wrapper of it has the same class name)."""
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


class RegionState:
    """Shared by one model's compiled layers: why their compile failed, if it did (then they all run eagerly)."""

    def __init__(self) -> None:
        self.failed: str | None = None


def compiled_layer_forward(self: nn.Module, *args, **kwargs):
    """The layer's forward through its compiled region while training, its own forward otherwise.

    The regions are an optimisation: if compiling one fails (inductor or Dynamo raising, on a model or GPU the
    tests have not seen), every layer of the model runs its own forward from then on and a warning says why; the
    step goes on, the layer's forward run again eagerly (it changes no state that a partly run region could have
    left). A CUDA OOM while compiling is raised as such, for the OOM ladder; errors while a compiled graph runs are
    not caught."""
    state: RegionState = self._trinity_region_state
    if self.training and state.failed is None:
        try:
            return self._trinity_compiled_forward(*args, **kwargs)
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
    :func:`nf4_base_forward`."""
    compiled, state = 0, RegionState()
    for layer in model.modules():
        if type(layer).__name__ not in LAYER_CLASSES or "forward" in layer.__dict__:
            continue
        for base in layer.modules():
            if isinstance(base, _bnb_linear4bit()) and "forward" not in base.__dict__:
                base.forward = types.MethodType(nf4_base_forward, base)
        layer._trinity_lora_modules = [m for m in layer.modules() if hasattr(m, "lora_magnitude_vector")]
        for module in layer._trinity_lora_modules:
            for dora in module.lora_magnitude_vector.values():
                if isinstance(dora, FastDoraLinearLayer):
                    dora.checked_by_region = True  # weight_norm may read its cache as it is inside the region
        layer._trinity_compiled_forward = floats_as_constants(
            torch.compile(types.MethodType(type(layer).forward, layer), dynamic=True, backend=backend))
        layer._trinity_region_state = state
        layer.forward = types.MethodType(compiled_layer_forward, layer)
        layer.register_forward_pre_hook(refresh_norms, with_kwargs=True)
        compiled += 1
    return compiled


__all__ = ["LAYER_CLASSES", "RegionState", "compile_decoder_layers", "compiled_layer_forward", "nf4_base_forward",
           "refresh_norms"]
