"""The merged checkpoint, checked weight by weight against the model that was evaluated, unloaded.

Scoring the merged model means loading it: 24 GB in 16 bits for Gemma-3-12B, more than a T4 has
(and 48 GB of host RAM in fp32 on CPU). But with ``merge_into="dequantized"`` the merge is exact by
construction, so the weights themselves can be checked instead: every tensor of ``merged/`` is read
from disk one at a time (:class:`~trinity_core.export.shards.SafetensorsReader`, never a whole shard) and
compared with the tensor the trained model in memory (the 4-bit base + adapter, as
:func:`trinity_core.evaluate.run.load_trained_model` loads it) computes with:

* a LoRA/DoRA module: ``W = dequant(W_nf4)`` of its loaded ``Linear4bit`` (or its 16-bit weight),
  ``Δ = s·B@A`` from the module's own A, B and ``scaling`` (rsLoRA's ``s`` included), in fp32, ``W + Δ``, and
  for DoRA ``m / ||W + Δ||_row · (W + Δ)``;
* any other 4-bit module: ``dequant(W_nf4)``; everything else (embedding, norms, vision tower,
  projector) the loaded tensor.

Three differences that are not merge errors, two of them handled here and one in the merge:

* a tensor the adapter does not touch, rounded to 16 bits when training loaded the base (Unsloth's T4
  path loads in fp16, or in bf16 where the card has it, whatever the checkpoint stores): the merged
  checkpoint keeps the base's own values. Such a tensor matches when the stored one, rounded to
  bf16 or fp16, equals the model's exactly; the report counts them per dtype (``rounded_at_load``).
  A bf16 checkpoint (the published ones) loaded in fp16 is exact but for fp16's subnormals, which
  ``ATOL`` covers; the fp32 tiny stand-in shows it.
* TF32: training stacks lower fp32 matmul precision (transformers' ``tf32``, Unsloth), which rounds
  the inputs to 10 mantissa bits on the GPU, and through oneDNN on a CPU that has the instructions.
  Both sides take ``s·B@A`` in float64, rounded to fp32 once
  (:func:`trinity_core.export.merge.exact_product`). With an fp32 product on the GPU the 12B stand-in's
  check reported all 168 adapted tensors off by up to 4.3e-4
  (bench/results/2026-11-28-h200-gpu_mm_job-5-in8g.log).
* The merge's 4-bit arithmetic on another device than training's: on the H200 host's CPU the tiny
  stand-in's merged tensors were up to 3.9e-4 off while every input (base, A, B, magnitude, scaling)
  was equal (bench/results/2026-11-28-h200-merge_diag-2.jsonl); the merge now does it on the trained
  model's device (``trinity_core.export.merge.Quant.device``).

None of it comes from :mod:`trinity_core.export.merge`'s reading of the adapter file or of the base's
shards, so a wrong scaling, a missed or misnamed module, a truncated or swapped tensor shows up as a
mismatch. A tensor matches when ``|merged − expected| <= ATOL + rtol·|expected|`` element-wise, rtol
one ulp of the stored dtype (the expected tensor is fp32; the merged one was rounded once).

Memory: one dequantised weight and its delta at a time on the model's device (~0.7 GiB in fp32 for
the 12B's largest projection), comparisons in blocks of :data:`BLOCK_ELEMENTS`; host RAM: one stored
tensor (the 12B's embedding, 1.9 GiB in bf16, is the largest).
"""

from __future__ import annotations

import time
from typing import Any

from trinity_core.export.merge import checkpoint_renamer, exact_product, shard_files
from trinity_core.export.shards import SafetensorsReader

ATOL = 1e-6
MIN_RTOL = 1e-5  # fp32 results computed in another order (B@A, the row norm) differ by a few 1e-7
BLOCK_ELEMENTS = 1 << 24
MAX_LISTED = 20


def _dense(weight: Any) -> Any:
    """A module weight as the forward uses it: a 4-bit one dequantised exactly, in its original dtype."""
    from trinity_core import nf4

    state = getattr(weight, "quant_state", None)
    return weight.detach() if state is None else nf4.dequantize(weight.data, state)


def _adapted(module: Any, adapter: str) -> bool:
    return adapter in (getattr(module, "lora_A", None) or {})


def delta_weight(module: Any, adapter: str) -> Any:
    """PEFT's ``s·B@A`` of a LoRA layer (its ``scaling``, rsLoRA's included, and ``fan_in_fan_out``),
    fp32. Not ``get_delta_weight``: that rounds the product to the adapter's dtype, and TRL keeps a
    QLoRA adapter's A and B in bf16 (``SFTTrainer`` casts them), so it would be a bf16 rounding away
    from the fp32 merge even when the merge is exact. The product is the merge's own
    (:func:`trinity_core.export.merge.exact_product`: float64, rounded to fp32 once), so no global
    matmul setting (TF32, see the module docstring) can touch it."""
    from peft.utils import transpose

    product = exact_product(module.lora_B[adapter].weight, module.lora_A[adapter].weight)
    return transpose(product, module.fan_in_fan_out) * module.scaling[adapter]


def expected_weight(module: Any, adapter: str) -> Any:
    """The effective weight (fp32) of a LoRA/DoRA layer of a ``PeftModel`` with ``adapter`` active."""
    import torch

    w = _dense(module.get_base_layer().weight).float() + delta_weight(module, adapter)
    magnitude = getattr(module, "lora_magnitude_vector", None) or {}
    if adapter in magnitude:
        w = (magnitude[adapter].weight.float() / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
    return w


def compare(expected: Any, stored: Any) -> tuple[float, int]:
    """``(max |stored − expected|, elements out of tolerance)``, in row blocks on ``expected``'s device."""
    import torch

    if not stored.is_floating_point():
        equal = torch.equal(stored, expected.to(stored.device, stored.dtype))
        return (0.0 if equal else float("inf")), (0 if equal else stored.numel())
    rtol = max(torch.finfo(stored.dtype).eps, MIN_RTOL)
    exp2 = expected.reshape(expected.shape[0] if expected.dim() else 1, -1)
    got2 = stored.reshape(exp2.shape)
    step = max(1, BLOCK_ELEMENTS // max(1, exp2.shape[1]))
    worst, bad = 0.0, 0
    for i in range(0, exp2.shape[0], step):
        e = exp2[i:i + step].float()
        d = (got2[i:i + step].to(e.device).float() - e).abs()
        if d.numel():
            worst = max(worst, d.max().item())
            bad += int((~(d <= ATOL + rtol * e.abs())).sum().item())  # NaN counts as bad
    return worst, bad


def rounded_at_load(expected: Any, stored: Any) -> str | None:
    """The 16-bit dtype that turns ``stored`` exactly into ``expected`` (a tensor training loaded in
    lower precision than the checkpoint stores), or None."""
    import torch

    if not stored.is_floating_point() or stored.dtype.itemsize <= 2:
        return None
    for dtype in (torch.bfloat16, torch.float16):
        rounded = stored.to(expected.device).to(dtype).to(expected.dtype)
        if torch.equal(rounded, expected):
            return str(dtype).removeprefix("torch.")
    return None


def check_merged_weights(trained_model: Any, merged_dir: Any) -> dict[str, Any]:
    """Compare every tensor of ``merged_dir`` with ``trained_model`` (a ``PeftModel``); see the module doc.

    Returns ``{"ok", "tensors", "adapted", "dequantized", "rounded_at_load": {dtype: n}, "max_abs_diff",
    "mismatches": [...], "missing_adapted": [...], "seconds"}``; ``ok`` is true when every tensor
    matches and every adapted module of the model was found in the checkpoint. ``max_abs_diff`` leaves
    out the tensors that match as rounded at load."""
    import torch

    t0 = time.monotonic()
    adapter = trained_model.active_adapter
    base = trained_model.get_base_model()
    rename = checkpoint_renamer(base)
    modules = dict(base.named_modules())
    adapted = {name for name, m in modules.items() if _adapted(m, adapter)}
    seen: set[str] = set()
    counts = {"tensors": 0, "adapted": 0, "dequantized": 0}
    rounded: dict[str, int] = {}
    worst, mismatches = 0.0, []
    with torch.no_grad():
        for shard in shard_files(merged_dir):
            with SafetensorsReader(shard) as reader:
                for key in reader.keys():
                    owner, _, attr = rename(key).rpartition(".")
                    module = modules.get(owner)
                    if module is None:
                        mismatches.append({"tensor": key, "reason": "not in the trained model"})
                        continue
                    as_loaded = False  # a tensor the model holds as loaded (not merged, not 4-bit)
                    if owner in adapted and attr == "weight":
                        expected = expected_weight(module, adapter)
                        seen.add(owner)
                        counts["adapted"] += 1
                    else:
                        tensor = getattr(module.get_base_layer() if owner in adapted else module, attr, None)
                        if tensor is None:
                            mismatches.append({"tensor": key, "reason": "not in the trained model"})
                            continue
                        as_loaded = getattr(tensor, "quant_state", None) is None
                        counts["dequantized"] += not as_loaded
                        expected = _dense(tensor)
                    stored = reader.get(key)
                    counts["tensors"] += 1
                    if tuple(stored.shape) != tuple(expected.shape):
                        mismatches.append({"tensor": key, "reason": f"shape {tuple(stored.shape)}, "
                                                                    f"model has {tuple(expected.shape)}"})
                        continue
                    diff, bad = compare(expected, stored)
                    if bad and as_loaded and (dtype := rounded_at_load(expected, stored)):
                        rounded[dtype] = rounded.get(dtype, 0) + 1
                        continue
                    worst = max(worst, diff)
                    if bad:
                        mismatches.append({"tensor": key, "max_abs_diff": diff, "bad_elements": bad})
                    del expected, stored
    missing = sorted(adapted - seen)
    return {"ok": not mismatches and not missing, **counts, "rounded_at_load": rounded, "max_abs_diff": worst,
            "mismatches": mismatches[:MAX_LISTED], "mismatched_tensors": len(mismatches),
            "missing_adapted": missing[:MAX_LISTED], "seconds": round(time.monotonic() - t0, 2)}
