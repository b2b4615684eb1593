"""Fast DoRA on 4-bit bases: the weight norm without the out × in matrix, once per optimizer step.

PEFT's DoRA (``peft.tuners.lora.dora.DoraLinearLayer``) dequantises the whole 4-bit weight and
builds ``W + s·B·A`` (out × in) to take its row norms in every forward, again in every
gradient-checkpoint recompute and for every gradient-accumulation micro-batch. With W frozen,

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ

- ``‖W_i‖²`` is computed once, when the layer is patched;
- ``W Aᵀ`` (out × r) is one pass over W, dequantised a block of rows at a time;
- ``A Aᵀ`` is r × r.

The norm is detached (the DoRA paper, section 4.3, and PEFT treat it as a constant in backward),
so it is computed under ``no_grad`` and cached until A or B change: the cache key holds a counter
bumped by a global ``torch.optim`` post-step hook plus A's and B's ``_version``, ``data_ptr`` and
dtype, so an optimizer step, an in-place edit, a load or a dtype cast all refresh it.

Cancellation: when ``s·B_i A ≈ -W_i`` the expanded sum loses the small result in fp32 rounding of
the large terms (error ≈ u·√in·(‖W_i‖² + s²·B_iAAᵀB_iᵀ), u = 2⁻²⁴). Rows whose squared norm falls
under ``CANCELLATION_RATIO`` of that scale are recomputed directly from their dequantised rows,
and the sum is clamped at 0 before the square root, so the norm stays within ~1e-4 relative of
the direct one everywhere (~1e-6 on ordinary rows).

Patching swaps the class of each LoRA layer's ``lora_magnitude_vector[adapter]`` module for
:class:`FastDoraLinearLayer` (a subclass that replaces ``forward`` and holds the cache) and its
``lora_variant[adapter]`` for :class:`FastDoraLinearVariant` (same merge/unmerge, a fused
forward). Parameter names, the adapter file, merging (PEFT's ``get_weight_norm``) and GGUF export
are unchanged.
``TRINITY_FAST_DORA=0`` turns it off (PEFT's own DoRA runs; used by the benchmark).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant

FAST_DORA_ENV = "TRINITY_FAST_DORA"
CANCELLATION_RATIO = 0.05
"""Rows with ‖W_i + s·B_iA‖² < this × (‖W_i‖² + s²·B_iAAᵀB_iᵀ) are recomputed directly."""
CHUNK_ELEMENTS = 1 << 24
"""Rows are dequantised at most ~16M elements (64 MB in fp32) at a time."""

_optimizer_steps = 0
_hook_handle = None


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """Optimizer steps taken in this process since fast DoRA was first enabled."""
    return _optimizer_steps


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
        """‖W_i + s·B_i A‖ for every output row, fp32, detached; cached until A or B change."""
        key = (_optimizer_steps, float(scaling), lora_A.device, lora_A.dtype, lora_B.dtype,
               lora_A._version, lora_B._version, lora_A.data_ptr(), lora_B.data_ptr())
        if key != self._cache_key:
            self._cached_norm = self._factored_norm(lora_A, lora_B, scaling, base_layer)
            self._cache_key = key
        return self._cached_norm

    @torch.no_grad()
    def _factored_norm(self, lora_A, lora_B, scaling, base_layer) -> torch.Tensor:
        a, b = lora_A.float(), lora_B.float()  # (r, in), (out, r)
        if self._w2.device != a.device:
            self.prepare(base_layer)
        wa = torch.cat([rows @ a.T for _, rows in _weight_rows(base_layer)])  # W Aᵀ, (out, r)
        quad = ((b @ (a @ a.T)) * b).sum(1)  # B_i (A Aᵀ) B_iᵀ
        n2 = self._w2 + 2.0 * scaling * (b * wa).sum(1) + scaling * scaling * quad
        scale = self._w2 + scaling * scaling * quad
        bad = n2 < CANCELLATION_RATIO * scale
        if bool(bad.any()):  # rare: recompute those rows from their dequantised weights
            idx = bad.nonzero().flatten()
            rows = _select_rows(base_layer, idx)
            n2[idx] = ((rows + scaling * (b[idx] @ a)) ** 2).sum(1)
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
    """The whole DoRA output in two kernels instead of PEFT's chain of fp32 element-wise passes.

    With g = m/‖W+sBA‖ (per output), PEFT returns ``result + (g-1)·base + g·s·B(Ax)``. Here
    ``(g-1)·base`` is one ``addcmul`` into ``result`` in the activation dtype (``g-1`` is small, so
    bf16 keeps its precision where ``g`` itself would lose it) and ``g·s`` is folded into the
    out × r matrix B, so ``B(Ax)`` and its addition are one ``addmm``. Dropout (which needs the
    base output of the dropped input) falls back to PEFT's arrangement.
    """

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        dora = module.lora_magnitude_vector[active_adapter]
        if not isinstance(dora, FastDoraLinearLayer) or (
                module.training and not isinstance(module.lora_dropout[active_adapter], torch.nn.Identity)):
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        base_layer = module.get_base_layer()
        g = dora.weight / dora.weight_norm(lora_A.weight, lora_B.weight, scaling, base_layer)
        bias = base_layer.bias
        base = result if bias is None else result - bias
        out = torch.addcmul(result, base, (g - 1).to(result.dtype))
        xa = lora_A(x)
        b_scaled = (lora_B.weight * (g * scaling).unsqueeze(1)).to(result.dtype)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]).to(result.dtype), b_scaled.T)
        return flat.view(out.shape)


def fast_dora_enabled() -> bool:
    """False when ``TRINITY_FAST_DORA`` is 0/false/no/off."""
    return os.environ.get(FAST_DORA_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def enable_fast_dora(model: torch.nn.Module) -> int:
    """Swap every PEFT DoRA linear layer of ``model`` for :class:`FastDoraLinearLayer`.

    Returns the number of layers patched (0 when ``TRINITY_FAST_DORA=0`` or no DoRA layer).
    Call it after ``get_peft_model`` and after the model is on its device.
    """
    global _hook_handle
    if not fast_dora_enabled():
        return 0
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
                patched += 1
    if patched and _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook_handle = register_optimizer_step_post_hook(_count_step)
    return patched


# --------------------------------------------------------------------------- weight rows


def _weight_rows(base_layer: torch.nn.Module) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, rows)`` of the layer's weight in fp32, a block of rows at a time.

    For a bitsandbytes ``Params4bit`` only that block is dequantised (rows are cut on quantisation
    block boundaries of the row-major packed data), so no out × in tensor is ever held.
    """
    weight = base_layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:  # a plain nn.Linear
        out_features, in_features = weight.shape
        step = max(1, CHUNK_ELEMENTS // in_features)
        for start in range(0, out_features, step):
            yield start, weight[start:start + step].float()
        return
    out_features, in_features = state.shape
    block = state.blocksize
    aligned = block // math.gcd(in_features, block)  # rows per whole number of quantisation blocks
    if weight.__class__.__name__ != "Params4bit" or getattr(state, "packing_format_for_cpu", False) \
            or (aligned * in_features) % 2:
        from peft.utils.integrations import dequantize_module_weight

        yield 0, dequantize_module_weight(base_layer).float()
        return
    absmax = state.absmax
    if state.nested:
        import bitsandbytes.functional as bnbf

        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    absmax = absmax.float()
    packed = weight.data.view(torch.uint8).reshape(-1)
    step = max(aligned, CHUNK_ELEMENTS // in_features // aligned * aligned)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        lo, hi = start * in_features, stop * in_features
        yield start, torch.ops.bitsandbytes.dequantize_4bit.default(
            packed[lo // 2:(hi + 1) // 2].reshape(-1, 1), absmax[lo // block:-(-hi // block)].contiguous(),
            block, state.quant_type, [stop - start, in_features], torch.float32)


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


__all__ = ["FastDoraLinearLayer", "FastDoraLinearVariant", "enable_fast_dora", "fast_dora_enabled",
           "optimizer_steps", "linear_norm_reference", "CANCELLATION_RATIO", "FAST_DORA_ENV"]
