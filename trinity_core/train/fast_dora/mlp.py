"""Fast DoRA's gated MLP: the magnitude gains of gate_proj and up_proj applied inside the activation.

A gated MLP (Gemma, Llama, Mistral, Qwen) computes ``down(act(gate(x)) ⊙ up(x))``. With DoRA on
gate and up, each projection returns ``g ⊙ z`` (z = Wx + s·B(Ax), g = m/‖W+sBA‖ per output), so
the two biggest projections of a layer (2 × 15360 outputs of 46592 on the 12B shape) each pay a
pass over their (tokens × out) output to scale it, and one in backward to unscale the gradient
and reduce the magnitude gradient, on top of the activation's own passes.

This module folds the gains into the activation instead: gate and up return z (the in-place
LoRA GEMM of :class:`~trinity_core.train.fast_dora.linear.LoraSum`, no gain), and :class:`GatedDoraAct` computes

    h = act(g_gate ⊙ e) ⊙ (g_up ⊙ u)

with, in backward, ``de``, ``du`` and the gain gradients ``Σ_t ∂h/∂g`` in one pass (a Triton
kernel on CUDA for tanh-GELU and SiLU; the same formula through autograd elsewhere). The gains
``m / ‖W+sBA‖`` (norm detached and cached per optimizer step) are ordinary autograd nodes, so the
magnitude gradients are PEFT's. Parameter names, the adapter file and merging are unchanged: only
the MLP's forward is replaced, per instance, and it falls back to the class's forward whenever a
projection is not in plain fast-DoRA training (adapters disabled or merged, several adapters,
dropout, a bias).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

try:  # module globals: inductor finds a user kernel's helpers (``_act``) among its function's globals
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

import trinity_core.train.fast_dora.linear as linear
import trinity_core.train.fast_dora.lora_in_gemm as lora_in_gemm
from trinity_core.train import nf4_dequant
from trinity_core.train.fast_dora.cast_input import base_and_adapter_input, consumable
from trinity_core.train.fast_dora.linear import LoraSum, dora_output, plain_fast_dora

GATED_MLP_CLASSES = frozenset({"GemmaMLP", "Gemma2MLP", "Gemma3MLP", "LlamaMLP", "MistralMLP", "Qwen2MLP",
                               "Qwen3MLP"})
"""MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

_ACTIVATIONS = {"GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                "GELUPytorchTanh": "gelu_tanh", "SiLU": "silu", "SiLUActivation": "silu"}
"""Activation modules the Triton kernel implements (by class name); others run through autograd."""

REGION_KERNELS = True
"""Inside a compiled region on CUDA, :class:`GatedActInGraph` runs the Triton kernels below through the
``torch.library.triton_op`` ``trinity::gated_act_kernel`` and its backward (inductor launches them from its
generated code, no Python dispatch). False: their arithmetic in torch operations for inductor to fuse, as from
2026-11-29 (night): on an H200 at the 12B shape, 48 layers, inductor's fusion of the backward (the gain sums
over tokens) took 97.7 ms of kernel time an optimizer step (call 21), the kernel 63.1 ms (call 16, through the
custom op); forward 54.0 against 37.1 ms (docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (late)")."""


def patch_gated_mlps(model: nn.Module) -> int:
    """Give every known gated MLP of ``model`` the fused fast-DoRA forward. Returns how many."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLP_CLASSES and "forward" not in module.__dict__ and all(
                hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(gated_dora_forward, module)
            patched += 1
    return patched


def gated_dora_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) ⊙ up(x))`` with gate's and up's DoRA gains applied inside the activation."""
    gate, up = self.gate_proj, self.up_proj
    if not (plain_fast_dora(gate) and plain_fast_dora(up)):
        return type(self).forward(self, x)
    e, u = pre_gain(gate, x), pre_gain(up, x)
    if _down_in_graph(self, e, u):  # inside a compiled region: the activation and down_proj's input GEMMs, one node
        down = self.down_proj
        name = down.active_adapters[0]
        weight = nf4_dequant.dequantize(down.get_base_layer().weight, e.dtype)
        result, xa = GatedActDownInGraph.apply(e, u, gain(gate).float(), gain(up).float(),
                                               _ACTIVATIONS[type(self.act_fn).__name__] == "gelu_tanh", weight,
                                               down.lora_A[name].weight)
        return dora_output(down, name, xa, result)
    return self.down_proj(consumable(gated_act(e, u, gain(gate), gain(up), self.act_fn)))  # read by down_proj only


DOWN_IN_GRAPH = True
"""Inside a compiled region, :class:`GatedActDownInGraph` where it applies (:func:`_down_in_graph`); False: the
activation node, then down_proj's own forward. Measured at 48 layers of the 12B shape (H200, call 32,
docs/BENCHMARKS.md): 5865.0 tok/s and a 11.049 GiB peak with it, 5814.7 tok/s and 11.449 GiB without, same run.
``bench/gpu_bench.py --no-down-in-graph`` turns it off; :data:`DOWN_PATHS` counts which way each traced backward
went."""

DOWN_PATHS: dict[tuple, int] = {}
"""(way, dtype of h's gradient, of d_xa, of A) → how many backward launches were traced so: "kernel" (``d_xa·A``
added in the kernel) or "torch" (tiles of fewer than 16 rows: a GEMM and a sum first). For the benchmark's rows."""


def _down_in_graph(mlp: nn.Module, e: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether the MLP's activation and down_proj run as :class:`GatedActDownInGraph`: while Dynamo traces
    (``train/compiled_layers``), without the custom-op arrangement, for an activation the kernels implement, and a
    down_proj in plain fast-DoRA mode with no hooks, whose base is a frozen NF4 layer that ``trinity::nf4_dequantize``
    covers in h's dtype and whose A is of that dtype or is cast to it by autocast (Unsloth's
    ``prepare_model_for_training`` can upcast the adapters to fp32 under bf16 autocast): then PEFT's forward
    computes the same ``A(h)``, in h's dtype."""
    down = mlp.down_proj
    if not (DOWN_IN_GRAPH and torch.compiler.is_compiling() and not linear.REGION_CUSTOM_OPS
            and type(mlp.act_fn).__name__ in _ACTIVATIONS and e.shape == u.shape and plain_fast_dora(down)
            and not (down._forward_hooks or down._forward_pre_hooks)):
        return False
    a_dtype = down.lora_A[down.active_adapters[0]].weight.dtype
    autocast = torch.is_autocast_enabled(e.device.type) and torch.get_autocast_dtype(e.device.type) == e.dtype
    return nf4_dequant.covers(down.get_base_layer(), e.dtype) and (a_dtype == e.dtype or autocast)


def pre_gain(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``z = Wx + s·B(Ax)``: the DoRA layer's output before its magnitude gain (PEFT's input casts); inside a
    compiled region one GEMM where :func:`~trinity_core.train.fast_dora.lora_in_gemm.applies`."""
    if lora_in_gemm.applies(module, x):
        return lora_in_gemm.lora_sum(module, x)
    name = module.active_adapters[0]
    x2 = x.reshape(-1, x.shape[-1])  # a 2-D base output is a fresh tensor (a 3-D one is a view of
    result, xa = base_and_adapter_input(module, name, x2)  # one), so the LoRA GEMM can accumulate into it
    z = LoraSum.apply(result, xa, module.lora_B[name].weight, float(module.scaling[name]))
    return z.view(*x.shape[:-1], z.shape[-1])


def gain(module: nn.Module) -> torch.Tensor:
    """``g = m / ‖W + s·BA‖`` (fp32, the norm detached and cached), differentiable in m."""
    name = module.active_adapters[0]
    dora = module.lora_magnitude_vector[name]
    norm = dora.weight_norm(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name],
                            module.get_base_layer())
    return dora.weight.float() / norm


def gated_act(e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
              act_fn: nn.Module) -> torch.Tensor:
    """``act(g_e ⊙ e) ⊙ (g_u ⊙ u)`` in e's dtype: one Triton pass each way on CUDA, autograd elsewhere;
    inside a compiled region :class:`GatedActInGraph` (the kernels as triton ops that inductor launches), or with
    ``linear.REGION_CUSTOM_OPS`` the custom op ``trinity::gated_act`` (below)."""
    kind = _ACTIVATIONS.get(type(act_fn).__name__)
    if kind is not None and e.shape == u.shape and torch.compiler.is_compiling():
        if not linear.REGION_CUSTOM_OPS:
            return GatedActInGraph.apply(e, u, g_e.float(), g_u.float(), kind == "gelu_tanh")
        return _gated_act_op(e.reshape(-1, e.shape[-1]), u.reshape(-1, u.shape[-1]), g_e.float(), g_u.float(),
                             kind == "gelu_tanh").view(e.shape)
    if e.is_cuda and kind is not None and e.shape == u.shape and _kernels() is not None:
        return GatedDoraAct.apply(e, u, g_e, g_u, kind, True)  # e, u: pre_gain's fresh outputs
    return act_fn(e * g_e.to(e.dtype)) * (u * g_u.to(u.dtype))


# With ``linear.REGION_CUSTOM_OPS`` (the A/B against GatedActInGraph; the arrangement until 2026-11-29), inside a
# compiled region (``train/compiled_layers``) the gated activation is the custom op
# ``trinity::gated_act`` with its backward ``trinity::gated_act_backward``: Dynamo keeps each as one opaque
# node (it cannot trace the Triton launches), and AOTAutograd puts the backward op in the backward graph. The
# same kernels as GatedDoraAct's on CUDA, the same arithmetic in torch elsewhere (fp32 inside); de and du
# are new tensors there (GatedDoraAct writes them over e and u: an op that mutated saved activations would
# need functionalisation to put them back).


@torch.library.custom_op("trinity::gated_act", mutates_args=())
def _gated_act_op(e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(g_e ⊙ e) ⊙ (g_u ⊙ u)`` for (T, N) ``e``, ``u`` and fp32 (N,) gains, in e's dtype."""
    e, u, g_e, g_u = e.contiguous(), u.contiguous(), g_e.contiguous(), g_u.contiguous()
    if e.is_cuda and _kernels() is not None:
        return _launch_forward(e, u, g_e, g_u, gelu)
    return _forward_torch(e, u, g_e, g_u, gelu)


@_gated_act_op.register_fake
def _(e, u, g_e, g_u, gelu):
    return torch.empty_like(e, memory_format=torch.contiguous_format)


@torch.library.custom_op("trinity::gated_act_backward", mutates_args=())
def _gated_act_backward_op(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
                           gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(de, du, dg_e, dg_u)`` of :func:`_gated_act_op` (see :class:`GatedDoraAct`), the sums in fp32."""
    dh, e, u, g_e, g_u = dh.contiguous(), e.contiguous(), u.contiguous(), g_e.contiguous(), g_u.contiguous()
    if e.is_cuda and _kernels() is not None:
        de, du = torch.empty_like(e), torch.empty_like(u)
        return de, du, *_launch_backward(dh, e, u, g_e, g_u, de, du, gelu)
    return _backward_torch(dh, e, u, g_e, g_u, gelu)


@_gated_act_backward_op.register_fake
def _(dh, e, u, g_e, g_u, gelu):
    n = e.shape[-1]
    return (torch.empty_like(e, memory_format=torch.contiguous_format),
            torch.empty_like(u, memory_format=torch.contiguous_format),
            e.new_empty((n,), dtype=torch.float32), e.new_empty((n,), dtype=torch.float32))


def _gated_act_setup(ctx, inputs, output):
    e, u, g_e, g_u, gelu = inputs
    ctx.save_for_backward(e, u, g_e, g_u)
    ctx.gelu = gelu


def _gated_act_grad(ctx, dh):
    e, u, g_e, g_u = ctx.saved_tensors
    de, du, d_ge, d_gu = _gated_act_backward_op(dh, e, u, g_e, g_u, ctx.gelu)
    return de, du, d_ge, d_gu, None


_gated_act_op.register_autograd(_gated_act_grad, setup_context=_gated_act_setup)


def _forward_torch(e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
                   gelu: bool) -> torch.Tensor:
    """The forward kernel's arithmetic in torch operations: fp32 inside, h in e's dtype."""
    val, _ = _act_torch(e.float() * g_e, gelu)
    return (val * u.float() * g_u).to(e.dtype)


def _backward_torch(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
                    gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel's arithmetic in torch operations (see :class:`GatedDoraAct`), over (T, N) tensors."""
    e32, u32, dh32 = e.float(), u.float(), dh.float()
    val, der = _act_torch(e32 * g_e, gelu)
    da, db = dh32 * u32 * g_u * der, dh32 * val
    return (da * g_e).to(e.dtype), (db * g_u).to(u.dtype), (da * e32).sum(0), (db * u32).sum(0)


class GatedActInGraph(torch.autograd.Function):
    """:class:`GatedDoraAct` for inside a compiled region, traced by Dynamo: on CUDA its Triton kernels through
    the triton ops ``trinity::gated_act_kernel`` and ``trinity::gated_act_kernel_backward``, which inductor
    launches from its generated code (:data:`REGION_KERNELS`); elsewhere, or with that off, their arithmetic in
    torch operations for inductor to fuse into the region's kernels. Saves e and u only, as the kernels do; de and
    du are new tensors (an op that wrote over saved activations would need functionalisation to put them back)."""

    @staticmethod
    def forward(ctx, e, u, g_e, g_u, gelu):
        ctx.save_for_backward(e, u, g_e, g_u)
        ctx.gelu = gelu
        if _in_kernels(e):
            n = e.shape[-1]
            return torch.ops.trinity.gated_act_kernel(e.reshape(-1, n), u.reshape(-1, n), g_e, g_u, gelu).view(e.shape)
        return _forward_torch(e, u, g_e, g_u, gelu)

    @staticmethod
    def backward(ctx, dh):
        e, u, g_e, g_u = ctx.saved_tensors
        n = e.shape[-1]
        grads = torch.ops.trinity.gated_act_kernel_backward if _in_kernels(e) else _backward_torch
        de, du, d_ge, d_gu = grads(dh.reshape(-1, n), e.reshape(-1, n), u.reshape(-1, n), g_e, g_u, ctx.gelu)
        return de.view(e.shape), du.view(u.shape), d_ge, d_gu, None


def _in_kernels(e: torch.Tensor) -> bool:
    """The triton ops (whose CPU fallback is the torch arithmetic, so the CPU tests trace the same graph)."""
    return REGION_KERNELS and (triton is not None or not e.is_cuda)


@torch.library.triton_op("trinity::gated_act_kernel", mutates_args=())
def _gated_act_kernel(e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
                      gelu: bool) -> torch.Tensor:
    """``act(g_e ⊙ e) ⊙ (g_u ⊙ u)`` of (T, N) ``e``, ``u`` and fp32 (N,) gains on CUDA: the forward kernel, which
    a compiled graph launches from its own code; without CUDA its arithmetic in torch operations."""
    e, u, g_e, g_u = e.contiguous(), u.contiguous(), g_e.contiguous(), g_u.contiguous()
    if not e.is_cuda:
        return _forward_torch(e, u, g_e, g_u, gelu)
    return _launch_forward(e, u, g_e, g_u, gelu, torch.library.wrap_triton)


@torch.library.triton_op("trinity::gated_act_kernel_backward", mutates_args=())
def _gated_act_kernel_backward(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor,
                               g_u: torch.Tensor, gelu: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(de, du, dg_e, dg_u)`` of :func:`_gated_act_kernel` (see :class:`GatedDoraAct`): the backward kernel, or
    its arithmetic in torch operations without CUDA."""
    dh, e, u, g_e, g_u = dh.contiguous(), e.contiguous(), u.contiguous(), g_e.contiguous(), g_u.contiguous()
    if not e.is_cuda:
        return _backward_torch(dh, e, u, g_e, g_u, gelu)
    de, du = torch.empty_like(e), torch.empty_like(u)
    return de, du, *_launch_backward(dh, e, u, g_e, g_u, de, du, gelu, torch.library.wrap_triton)


@torch.library.triton_op("trinity::gated_act_down_kernel_backward", mutates_args=())
def _gated_act_down_kernel_backward(dh: torch.Tensor, d_xa: torch.Tensor, lora_a: torch.Tensor, e: torch.Tensor,
                                    u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor, gelu: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_gated_act_kernel_backward` for h's gradient ``dh + d_xa·A`` (:class:`GatedActDownInGraph`): the sum
    inside the backward kernel, or in torch operations without CUDA."""
    dh, d_xa, lora_a = dh.contiguous(), d_xa.contiguous(), lora_a.contiguous()
    e, u, g_e, g_u = e.contiguous(), u.contiguous(), g_e.contiguous(), g_u.contiguous()
    if not e.is_cuda:
        return _backward_down_torch(dh, d_xa, lora_a, e, u, g_e, g_u, gelu)
    de, du = torch.empty_like(e), torch.empty_like(u)
    return de, du, *_launch_backward(dh, e, u, g_e, g_u, de, du, gelu, torch.library.wrap_triton, d_xa, lora_a)


def _backward_down_torch(dh, d_xa, lora_a, e, u, g_e, g_u, gelu):
    """The arithmetic of :func:`_gated_act_down_kernel_backward` in torch operations: autograd's sum of h's two
    gradients (the base's, the adapter's), then :func:`_backward_torch`."""
    return _backward_torch(dh + d_xa.to(dh.dtype).mm(lora_a.to(dh.dtype)), e, u, g_e, g_u, gelu)


class GatedActDownInGraph(torch.autograd.Function):
    """:class:`GatedActInGraph` and down_proj's two GEMMs of its input, one node: ``(h Wᵀ, h Aᵀ)`` for the frozen
    base W (dequantised inside the region) and the adapter's A, h the gated activation (not returned).

    Why one node: h's gradient is the sum of the base's ``d_base·W`` and the adapter's ``d_xa·A``. As two nodes,
    inductor computes the adapter's part by a GEMM into a (tokens × N) tensor and sums the two in a separate pass
    (it cannot fuse the sum into the activation's backward kernel, a Triton kernel of its own), 41 + 88 µs a
    layer at the 12B shape (H200, call 30, docs/BENCHMARKS.md); here the kernel adds ``d_xa·A`` a tile at a
    time (a ``tl.dot`` with K = r). A's gradient is ``d_xaᵀ h``, as the Linear's."""

    @staticmethod
    def forward(ctx, e, u, g_e, g_u, gelu, weight, lora_a):
        n = e.shape[-1]
        e2, u2 = e.reshape(-1, n), u.reshape(-1, n)
        h = (torch.ops.trinity.gated_act_kernel(e2, u2, g_e, g_u, gelu) if _in_kernels(e)
             else _forward_torch(e2, u2, g_e, g_u, gelu))
        ctx.save_for_backward(e2, u2, g_e, g_u, weight, lora_a, h)
        ctx.gelu, ctx.shape = gelu, e.shape
        lead = e.shape[:-1]
        xa = h.mm(lora_a.to(h.dtype).t())  # in h's dtype, as autocast computes A(h) (the caller checks)
        return h.mm(weight.t()).view(*lead, weight.shape[0]), xa.view(*lead, lora_a.shape[0])

    @staticmethod
    def backward(ctx, d_base, d_xa):
        e, u, g_e, g_u, weight, lora_a, h = ctx.saved_tensors
        dh = d_base.reshape(-1, weight.shape[0]).mm(weight)
        dxa2 = d_xa.reshape(-1, lora_a.shape[0])
        grads = torch.ops.trinity.gated_act_down_kernel_backward if _in_kernels(e) else _backward_down_torch
        de, du, d_ge, d_gu = grads(dh, dxa2, lora_a, e, u, g_e, g_u, ctx.gelu)
        d_a = dxa2.t().mm(h.to(dxa2.dtype)).to(lora_a.dtype) if ctx.needs_input_grad[6] else None
        return de.view(ctx.shape), du.view(ctx.shape), d_ge, d_gu, None, None, d_a


def _act_torch(a: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a), act'(a)) of fp32 ``a``, as the Triton kernels' ``_act`` computes them: tanh-GELU or SiLU."""
    if gelu:
        c = 0.7978845608028654
        th = torch.tanh(c * (a + 0.044715 * a * a * a))
        return 0.5 * a * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * a * a)
    sig = torch.sigmoid(a)
    return a * sig, sig * (1.0 + a * (1.0 - sig))


class GatedDoraAct(torch.autograd.Function):
    """``h = act(g_e ⊙ e) ⊙ (g_u ⊙ u)`` for (…, N) ``e``, ``u`` and fp32 (N,) gains, on CUDA.

    Saves e and u only (the stock MLP saves e, act(e) and u). With ``consume`` (e and u fresh
    tensors that nothing else reads, as in :func:`gated_dora_forward`) backward writes ``de`` and ``du``
    over them (each element is read before it is written, by the same program): the (tokens × N)
    gradients take no new memory, at the point of the layer's backward where the most is alive (on
    the 12B shape 2 × 120 MiB in fp16). That node's backward runs once: a second one
    (``retain_graph``) raises. Backward, with a = g_e⊙e:
    ``de = dh ⊙ g_u u ⊙ act'(a) ⊙ g_e``, ``du = dh ⊙ act(a) ⊙ g_u``, ``dg_e = Σ_t dh ⊙ g_u u ⊙ act'(a) ⊙ e``,
    ``dg_u = Σ_t dh ⊙ act(a) ⊙ u``, all in fp32 registers, the sums in fp32."""

    @staticmethod
    def forward(ctx, e, u, g_e, g_u, kind, consume=False):
        shape, n = e.shape, e.shape[-1]
        e2, u2 = e.reshape(-1, n).contiguous(), u.reshape(-1, n).contiguous()
        g_e, g_u = g_e.detach().float().contiguous(), g_u.detach().float().contiguous()
        h = _launch_forward(e2, u2, g_e, g_u, kind == "gelu_tanh")
        ctx.save_for_backward(e2, u2, g_e, g_u)
        ctx.kind, ctx.shape, ctx.consume, ctx.consumed = kind, shape, consume, False
        return h.view(shape)

    @staticmethod
    def backward(ctx, dh):
        if ctx.consumed:
            raise RuntimeError("GatedDoraAct: backward already ran and overwrote its saved activations "
                               "with their gradients; it cannot run twice (retain_graph)")
        ctx.consumed = ctx.consume
        e2, u2, g_e, g_u = ctx.saved_tensors
        dh2 = dh.reshape(-1, e2.shape[1]).contiguous()
        de, du = (e2, u2) if ctx.consume else (torch.empty_like(e2), torch.empty_like(u2))
        d_ge, d_gu = _launch_backward(dh2, e2, u2, g_e, g_u, de, du, ctx.kind == "gelu_tanh")
        return de.view(ctx.shape), du.view(ctx.shape), d_ge, d_gu, None, None


_BLOCK_T, _BLOCK_N = 32, 128  # the forward kernel's tile


@dataclass(frozen=True)
class BackwardTiles:
    """The backward kernel's launch: each program takes ``rows`` tokens (in steps of ``block_t``) by ``block_n``
    columns with ``warps`` warps, and writes one row of partial gain sums (a (tokens / rows, N) fp32 tensor,
    summed after the kernel). ``dot_acc`` (1: with down_proj's adapter part, :data:`DOWN_TILES`): the tile of h's
    gradient enters ``tl.dot`` as its accumulator instead of being added to the product afterwards."""

    rows: int
    block_t: int
    block_n: int
    warps: int
    dot_acc: int = 0

    def __post_init__(self):
        if self.dot_acc not in (0, 1):
            raise ValueError(f"BackwardTiles.dot_acc must be 0 or 1, not {self.dot_acc}")
        for name in ("rows", "block_t", "block_n", "warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BackwardTiles.{name} must be a power of two, not {value}")
        if self.rows % self.block_t:
            raise ValueError(f"BackwardTiles.block_t ({self.block_t}) must divide rows ({self.rows})")


BACKWARD_TILES = BackwardTiles(rows=256, block_t=16, block_n=128, warps=4)
"""The backward kernel's tiles: the fastest of 32 in ``bench/gated_act_sweep.py`` on an H200 at the 12B shape
(4096 × 15360, bf16): 0.216 ms a launch, against 0.330 ms for the kernel before (one reduction across the
program's threads per step of 32 rows) and 0.151 ms for inductor's kernel of LoRA's activation backward
(docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (session of the evening)", call 26)."""

DOWN_TILES = BackwardTiles(rows=256, block_t=16, block_n=128, warps=4)
"""The backward kernel's tiles when it also adds ``d_xa·A`` (:class:`GatedActDownInGraph`): the fastest of 60 in
``bench/gated_act_sweep.py --lora 64`` at the 12B shape (H200, call 33: 0.357 ms a launch, ``dot_acc`` 0 or 1 the
same; 0.352 ms for the GEMM, the sum and the kernel without the product; docs/BENCHMARKS.md)."""


def _launch_forward(e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
                    gelu: bool, wrap=lambda kernel: kernel) -> torch.Tensor:
    """h of contiguous (T, N) ``e``, ``u`` and fp32 gains: the forward Triton kernel (GatedDoraAct's and the ops');
    ``wrap``: ``torch.library.wrap_triton`` inside a triton op."""
    h = torch.empty_like(e)
    wrap(_forward_kernel)[(_cdiv(e.shape[0], _BLOCK_T), _cdiv(e.shape[1], _BLOCK_N))](
        e, u, g_e, g_u, h, e.shape[0], e.shape[1], GELU=gelu, BLOCK_T=_BLOCK_T, BLOCK_N=_BLOCK_N)
    return h


def _launch_backward(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, g_e: torch.Tensor, g_u: torch.Tensor,
                     de: torch.Tensor, du: torch.Tensor, gelu: bool, wrap=lambda kernel: kernel,
                     d_xa: torch.Tensor | None = None, lora_a: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward Triton kernel: writes ``de`` and ``du`` (which may be ``e`` and ``u`` themselves: each element
    is read before it is written) and returns the gain gradients, two separate fp32 (N,) tensors (an op's
    outputs may not alias each other). With ``d_xa`` (T, r) and ``lora_a`` (r, N), contiguous, of one dtype, h's
    gradient is ``dh + d_xa·A`` (down_proj's adapter's part, :class:`GatedActDownInGraph`), added inside the
    kernel (fp32, a ``tl.dot`` a tile of rows; tiles of fewer than 16 rows add it in torch first)."""
    t, n = e.shape
    lora = d_xa is not None
    tiles = DOWN_TILES if lora else BACKWARD_TILES
    if lora:
        key = ("kernel" if tiles.block_t >= 16 else "torch", str(dh.dtype), str(d_xa.dtype), str(lora_a.dtype))
        DOWN_PATHS[key] = DOWN_PATHS.get(key, 0) + 1
        # one dtype for the dot: h's gradient's where it is 16-bit (A(h) was computed in it: autocast), else d_xa's
        dtype = dh.dtype if dh.dtype in (torch.float16, torch.bfloat16) else d_xa.dtype
        d_xa, lora_a = d_xa.to(dtype).contiguous(), lora_a.to(dtype).contiguous()
        if tiles.block_t < 16:  # tl.dot takes at least 16 rows
            dh, lora = dh + d_xa.mm(lora_a).to(dh.dtype), False
    r = int(d_xa.shape[1]) if lora else 0  # a constant of the launch (BLOCK_R), also under dynamic shapes
    blocks = _cdiv(t, tiles.rows)
    # two tensors, not views of one: a triton op's kernel that writes into views leaves their writeback to
    # functionalisation, and a compiled graph's gain sums differed from eager ones at 4096 rows (call 22; cause not
    # established: the sums' order, or that writeback)
    pe, pu = (torch.empty((blocks, n), device=e.device, dtype=torch.float32) for _ in range(2))
    wrap(_backward_kernel)[(blocks, _cdiv(n, tiles.block_n))](
        dh, e, u, g_e, g_u, de, du, pe, pu, d_xa if lora else dh, lora_a if lora else dh, t, n, r, GELU=gelu,
        ROWS=tiles.rows, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, LORA=lora,
        BLOCK_R=max(16, triton.next_power_of_2(r)) if r else 16, IEEE=lora and d_xa.dtype == torch.float32,
        DOT_ACC=lora and bool(tiles.dot_acc), **({} if tiles.warps == 4 else {"num_warps": tiles.warps}))
    # (4 warps: Triton's default; inside a compiled graph a launch's num_warps wraps the kernel in a one-config
    # autotuner)
    return pe.sum(0), pu.sum(0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernels():
    """(forward, backward) Triton kernels of :class:`GatedDoraAct`, or None without Triton."""
    return None if triton is None else (_forward_kernel, _backward_kernel)


if triton is not None:  # module-level kernels: inductor reads a user kernel's source and its helpers from here

    @triton.jit
    def _act(a, GELU: tl.constexpr):
        """(act(a), act'(a)) in fp32: tanh-GELU or SiLU."""
        if GELU:
            c = 0.7978845608028654  # √(2/π)
            inner = c * (a + 0.044715 * a * a * a)
            th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
            val = 0.5 * a * (1.0 + th)
            der = 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * a * a)
        else:
            sig = tl.sigmoid(a)
            val = a * sig
            der = sig * (1.0 + a * (1.0 - sig))
        return val, der

    @triton.jit
    def _forward_kernel(e_ptr, u_ptr, ge_ptr, gu_ptr, h_ptr, T, N, GELU: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows[:, None] < T) & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        ge = tl.load(ge_ptr + cols, mask=cmask, other=0.0)
        gu = tl.load(gu_ptr + cols, mask=cmask, other=0.0)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        val, _ = _act(e * ge[None, :], GELU)
        tl.store(h_ptr + offs, (val * u * gu[None, :]).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(dh_ptr, e_ptr, u_ptr, ge_ptr, gu_ptr, de_ptr, du_ptr, pe_ptr, pu_ptr, xa_ptr, a_ptr, T, N,
                         R, GELU: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         LORA: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, DOT_ACC: tl.constexpr):
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ge = tl.load(ge_ptr + cols, mask=cmask, other=0.0)[None, :]
        gu = tl.load(gu_ptr + cols, mask=cmask, other=0.0)[None, :]
        if LORA:  # dh = dh + d_xa·A: down_proj's adapter's part of h's gradient, added here (no GEMM, no add pass)
            rr = tl.arange(0, BLOCK_R)
            a_tile = tl.load(a_ptr + rr[:, None] * N + cols[None, :], mask=(rr[:, None] < R) & cmask[None, :],
                             other=0.0)  # (BLOCK_R, BLOCK_N) of A, once a program
        # the sums over tokens stay per row of the tile until the loop ends: one reduction across the program's
        # threads per program, not one per step (tl.full: tl.zeros is a jit function the interpreter may miss)
        acc_e = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
        for t in range(0, ROWS, BLOCK_T):
            rows = (pid_t * ROWS + t + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask = (rows[:, None] < T) & cmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if LORA:
                xa = tl.load(xa_ptr + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < T) & (rr[None, :] < R),
                             other=0.0)
                if DOT_ACC:  # h's gradient as the product's accumulator
                    dh = tl.dot(xa, a_tile, dh, input_precision="ieee" if IEEE else None)
                else:  # fp32 accumulation, then the sum
                    dh += tl.dot(xa, a_tile, input_precision="ieee" if IEEE else None)
            e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            val, der = _act(e * ge, GELU)
            da = dh * u * gu * der  # ∂L/∂a, a = g_e·e
            db = dh * val  # ∂L/∂b, b = g_u·u
            tl.store(de_ptr + offs, (da * ge).to(de_ptr.dtype.element_ty), mask=mask)
            tl.store(du_ptr + offs, (db * gu).to(du_ptr.dtype.element_ty), mask=mask)
            acc_e += da * e
            acc_u += db * u
        tl.store(pe_ptr + pid_t * N + cols, tl.sum(acc_e, axis=0), mask=cmask)
        tl.store(pu_ptr + pid_t * N + cols, tl.sum(acc_u, axis=0), mask=cmask)


__all__ = ["BACKWARD_TILES", "DOWN_IN_GRAPH", "DOWN_PATHS", "DOWN_TILES", "GATED_MLP_CLASSES", "BackwardTiles",
           "GatedActDownInGraph", "GatedActInGraph", "GatedDoraAct", "gain",
           "gated_act", "gated_dora_forward", "patch_gated_mlps", "pre_gain"]
