"""The adapter's product inside the base GEMM: ``z = [x | A(x)] · [W | s·B]ᵀ``, one GEMM with K = in + r.

Why: inside a compiled region ``W x + s·B(A x)`` was the base GEMM, then the LoRA GEMM accumulated into the base
output (PEFT's and Unsloth's ``addmm_``). Functionalised, that in-place ``addmm_`` becomes ATen's ``addmm`` into a
new buffer, which first copies the whole (tokens × out) base output there (a device-to-device memcpy) and then
reads and writes it again in cuBLAS's accumulating GEMM: 58 + 101 µs for gate_proj at the 12B shape, ~455 µs a
layer's forward over its seven projections, twice a micro-batch under gradient checkpointing (H200, call 33,
docs/BENCHMARKS.md; Unsloth's compiled LoRA has the same copies). Here the dequantisation kernel writes W into the
first ``in`` columns of an (out, in + r) buffer whose last r columns are ``s·B`` (``nf4_dequant.dequantize``'s
``tail``), x and A(x) are concatenated (a copy of x, tokens × in), and one GEMM writes z: no copy of the output,
no second pass over it. Backward: ``[dx | d(A x)] = dz · [W | s·B]`` (one GEMM; A(x)'s gradient comes with x's),
and ``dB = s·dzᵀ A(x)``; W gets no gradient (frozen).

It applies (:func:`applies`) inside a compiled region to a plain fast-DoRA layer whose frozen NF4 base
``nf4_dequant`` covers in x's dtype, where the output is wider than half the input (the copy of x costs less than
the output's copy and pass it saves: every projection of Gemma-3 but down_proj). z is the DoRA output before its
gain; :class:`DoraGain` applies ``g = m / ‖W + s·BA‖``. A plain LoRA layer's output is z itself
(:func:`applies_lora`, :data:`LORA_ENABLED`; gate, up and o_proj: :data:`LORA_PROJECTIONS`)."""

from __future__ import annotations

import torch
from torch import nn

import trinity_core.train.fast_dora.linear as linear
from trinity_core.train import nf4_dequant

ENABLED = True
"""Inside compiled regions, the adapter's product in the base GEMM where :func:`applies` (False: the base GEMM and
PEFT's accumulating GEMM, the arrangement until 2026-11-30; ``bench/gpu_bench.py --no-lora-in-gemm``). Measured at
48 layers of the 12B shape (H200, call 34, docs/BENCHMARKS.md): 6076.5 tok/s with it, 5905.3 without, same run."""

LORA_ENABLED = True
"""The same for plain LoRA layers (:func:`applies_lora`) of :data:`LORA_PROJECTIONS`: Trinity's LoRA path inside
compiled regions, whose layers otherwise run PEFT's forward (the base GEMM, the adapter's GEMMs and an add;
``bench/gpu_bench.py --no-lora-in-gemm``). Measured at 48 layers of the 12B shape (H200, docs/BENCHMARKS.md): on
gate, up and o_proj 6319.6 tok/s against 6122.1 without (call 38, same run); on every projection 4263.6 against
6195.7 (call 36), its attention kernels 2-4x slower (call 37, 4 layers, profiled) where q, k and v are the GEMM's
output itself (in fast DoRA the gain's product sits between and every projection gains)."""

PROJECTIONS: frozenset[str] | None = None
"""The fast-DoRA projections (``q_proj``, ``gate_proj``, ...: the layer's name in its decoder layer) where
:func:`applies` may hold; None: every one. ``train/compiled_layers`` sets each LoRA layer's
``_trinity_projection``."""

LORA_PROJECTIONS: frozenset[str] | None = frozenset({"gate_proj", "up_proj", "o_proj"})
"""The plain LoRA projections where :func:`applies_lora` may hold (None: every one): not q, k and v (call 37,
:data:`LORA_ENABLED`). ``bench/gpu_bench.py --lora-in-gemm-projections`` sets both sets."""


def applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s output is computed here: while Dynamo traces, without the custom-op arrangement, a plain
    fast-DoRA layer with no hooks on its base, its frozen NF4 base covered by ``nf4_dequant`` in x's dtype, A of
    that dtype or cast to it by autocast, and out > in / 2."""
    return (ENABLED and torch.compiler.is_compiling() and not linear.REGION_CUSTOM_OPS
            and _selected(module, PROJECTIONS) and linear.plain_fast_dora(module) and _base_covered(module, x))


def applies_lora(module: nn.Module, x: torch.Tensor) -> bool:
    """:func:`applies` for a plain LoRA layer (:data:`LORA_ENABLED`): one active adapter, not merged, no DoRA or
    other variant, no dropout while training, no bias or hooks on B."""
    return (LORA_ENABLED and torch.compiler.is_compiling() and not linear.REGION_CUSTOM_OPS
            and _selected(module, LORA_PROJECTIONS) and _plain_lora(module) and _base_covered(module, x))


def _selected(module: nn.Module, projections: frozenset[str] | None) -> bool:
    return projections is None or getattr(module, "_trinity_projection", None) in projections


def _plain_lora(module: nn.Module) -> bool:
    if getattr(module, "disable_adapters", True) or getattr(module, "merged", True) or not hasattr(module, "lora_A"):
        return False
    names = module.active_adapters
    if len(names) != 1 or names[0] not in module.lora_A:
        return False
    name, lora_b = names[0], module.lora_B[names[0]]
    return (name not in module.lora_magnitude_vector and name not in getattr(module, "lora_variant", {})
            and not getattr(module, "use_dora", {}).get(name, False) and lora_b.bias is None
            and not (lora_b._forward_hooks or lora_b._forward_pre_hooks)  # B is read, not called
            and (not module.training or isinstance(module.lora_dropout[name], nn.Identity)))


def _base_covered(module: nn.Module, x: torch.Tensor) -> bool:
    """The frozen NF4 base in x's dtype, no hooks on it, A of x's dtype or cast to it by autocast, out > in / 2."""
    base = module.get_base_layer()
    name = module.active_adapters[0]
    a_dtype = module.lora_A[name].weight.dtype
    autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == x.dtype
    return (nf4_dequant.covers(base, x.dtype) and (a_dtype == x.dtype or autocast)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and 2 * base.weight.quant_state.shape[0] > base.weight.quant_state.shape[1])


def region_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A fast-DoRA layer's forward inside a compiled decoder layer (installed per instance by
    ``train/compiled_layers`` over :func:`~trinity_core.train.fast_dora.linear.fast_dora_forward`):
    :func:`dora_forward` where :func:`applies`, else that forward."""
    if not (args or kwargs) and applies(self, x):
        return dora_forward(self, x)
    return linear.fast_dora_forward(self, x, *args, **kwargs)


def region_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer's forward inside a compiled decoder layer (installed per instance by ``train/compiled_layers`` on
    LoRA layers without a forward of their own): :func:`lora_sum` where :func:`applies_lora`, else the class's."""
    if not (args or kwargs) and applies_lora(self, x):
        return lora_sum(self, x)
    return type(self).forward(self, x, *args, **kwargs)


def lora_sum(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``z = W x + s·B(A x)`` of a layer :func:`applies` to, in x's dtype: one :class:`LoraInGemm` node."""
    name = module.active_adapters[0]
    xa = module.lora_A[name](x)  # PEFT's A(x) (autocast computes it in x's dtype)
    lora_b = module.lora_B[name].weight
    scaling = float(module.scaling[name])
    tail = (lora_b.detach() * scaling).to(x.dtype)
    w_cat = nf4_dequant.dequantize(module.get_base_layer().weight, x.dtype, tail)
    return LoraInGemm.apply(x, xa, w_cat, lora_b, scaling)


def dora_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``g ⊙ (W x + s·B(A x))``: the fast-DoRA layer's output (:func:`lora_sum`, then :class:`DoraGain`)."""
    name = module.active_adapters[0]
    dora = module.lora_magnitude_vector[name]
    norm = dora.weight_norm(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name],
                            module.get_base_layer())
    return DoraGain.apply(lora_sum(module, x), dora.weight, norm)


class LoraInGemm(torch.autograd.Function):
    """``z = [x | xa] · w_catᵀ`` with ``w_cat = [W | s·B]`` (out, in + r), in x's dtype; gradients of x, xa
    (``[dx | dxa] = dz · w_cat``) and B (``s·dzᵀ xa``, in B's dtype; ``b`` is passed for it, its values are in
    w_cat's tail). ``w_cat`` gets none (a frozen weight and a detached copy of B)."""

    @staticmethod
    def forward(ctx, x, xa, w_cat, b, scaling):
        ctx.set_materialize_grads(False)
        n_in = x.shape[-1]
        x2, xa2 = x.reshape(-1, n_in), xa.reshape(-1, xa.shape[-1]).to(x.dtype)
        z = torch.cat([x2, xa2], dim=1).mm(w_cat.t())
        ctx.save_for_backward(xa2, w_cat)
        ctx.scaling, ctx.meta = scaling, (x.shape, xa.shape, xa.dtype, b.dtype)
        return z.view(*x.shape[:-1], w_cat.shape[0])

    @staticmethod
    def backward(ctx, dz):
        if dz is None:
            return None, None, None, None, None
        xa2, w_cat = ctx.saved_tensors
        x_shape, xa_shape, xa_dtype, b_dtype = ctx.meta
        dz2 = dz.reshape(-1, w_cat.shape[0])
        n_in = x_shape[-1]
        need_x, need_xa, _, need_b = ctx.needs_input_grad[:4]
        d_cat = dz2.mm(w_cat) if (need_x or need_xa) else None
        dx = d_cat[:, :n_in].reshape(x_shape) if need_x else None
        d_xa = d_cat[:, n_in:].reshape(xa_shape).to(xa_dtype) if need_xa else None
        d_b = dz2.t().mm(xa2).mul_(ctx.scaling).to(b_dtype) if need_b else None
        return dx, d_xa, None, d_b, None


class DoraGain(torch.autograd.Function):
    """``y = g ⊙ z`` with ``g = m / norm`` (norm detached), as :class:`~trinity_core.train.fast_dora.linear.DoraOutput`
    computes it from its z (``z + z ⊙ (g - 1)``); gradients ``dz = g ⊙ dy`` and ``dm = Σ_t dy ⊙ z / norm``."""

    @staticmethod
    def forward(ctx, z, magnitude, norm):
        ctx.set_materialize_grads(False)
        g = magnitude.detach().to(linear._acc_dtype(magnitude)) / norm
        ctx.save_for_backward(z, g, norm)
        ctx.m_dtype = magnitude.dtype
        return torch.addcmul(z, z, (g - 1).to(z.dtype))

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None
        z, g, norm = ctx.saved_tensors
        out = z.shape[-1]
        dz, dyz = linear.scale_and_reduce(dy.reshape(-1, out), z.reshape(-1, out), g)
        d_m = (dyz / norm).to(ctx.m_dtype) if ctx.needs_input_grad[1] else None
        return dz.reshape(z.shape) if ctx.needs_input_grad[0] else None, d_m, None


__all__ = ["ENABLED", "LORA_ENABLED", "LORA_PROJECTIONS", "PROJECTIONS", "DoraGain", "LoraInGemm", "applies",
           "applies_lora", "dora_forward", "lora_sum", "region_forward", "region_lora_forward"]
