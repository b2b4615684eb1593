"""Fast DoRA: PEFT's DoRA layers with a factored weight norm refreshed in the optimizer step
(``linear``) and a fused gated MLP (``mlp``); PEFT's names and adapter file format are kept.
Both backends call :func:`enable_fast_dora` after ``get_peft_model`` when the job uses DoRA and
``RunOptions.fast_dora`` is on."""

from __future__ import annotations

from typing import Any

from trinity_core.train.fast_dora.linear import patch_linear_layers
from trinity_core.train.fast_dora.mlp import patch_gated_mlps


def enable_fast_dora(model: Any) -> int:
    """Patch every PEFT DoRA linear layer of ``model`` (then its gated MLPs); the number of layers
    patched (0 without DoRA layers). Call it after ``get_peft_model``, with the model on its device."""
    patched = patch_linear_layers(model)
    if patched:
        patch_gated_mlps(model)
    return patched
