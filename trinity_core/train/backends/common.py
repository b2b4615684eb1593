"""What both backends share: dtype choice, the LoRA config, and what of a multimodal Gemma-3 stays
out of reach: bitsandbytes leaves its vision tower and projector unquantised, LoRA leaves them alone."""

from __future__ import annotations

from typing import Any

from trinity_core import gpu
from trinity_core.spec import JobSpec


def compute_dtype(spec: JobSpec) -> Any:
    """``auto``: bf16 where the GPU supports it, fp16 on older GPUs (T4), fp32 on CPU (``gpu.compute_dtype``)."""
    return gpu.compute_dtype(spec.model.compute_dtype)


def lora_kwargs(spec: JobSpec) -> dict[str, Any]:
    """The adapter settings, shared by PEFT's LoraConfig and Unsloth's get_peft_model."""
    return {
        "r": spec.lora.r,
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": spec.lora.dropout,
        "target_modules": list(spec.lora.target_modules),
        "use_rslora": spec.lora.use_rslora,
        "use_dora": spec.lora.use_dora,
        "bias": "none",
    }


NON_LANGUAGE = ("vision_tower", "multi_modal_projector")
"""The parts of a Gemma3ForConditionalGeneration a text-only job must leave exactly as they are."""
EXCLUDE_NON_LANGUAGE = r"(.*\.)?(vision_tower|multi_modal_projector)(\..*)?"
"""PEFT ``exclude_modules`` (a regex, full match): no adapter anywhere under :data:`NON_LANGUAGE`."""
UNQUANTIZED = ("lm_head", "multi_modal_projector", "vision_tower")
"""What the published ``unsloth/gemma-3-12b-it-bnb-4bit`` keeps in 16 bits (FACTS.md; its
``llm_int8_skip_modules`` also names other models' projectors)."""


def is_multimodal(config: Any) -> bool:
    """A config (object or ``config.json`` dict) with a vision tower."""
    return (config.get("vision_config") if isinstance(config, dict) else getattr(config, "vision_config", None)) \
        is not None


def bnb_skip_modules(skip: list[str] | tuple[str, ...]) -> list[str]:
    """``llm_int8_skip_modules`` that transformers 5 also matches: it compares a pattern with the start
    of a module's full name (``model.vision_tower.…``), where transformers 4 (which wrote the published
    checkpoints) looked for it anywhere (``vision_tower.…``). Each name is kept and also given under
    ``model.``, so the same list leaves the same modules unquantised in both."""
    out = list(skip)
    out += [f"model.{name}" for name in skip if not name.startswith("model.") and f"model.{name}" not in out]
    return out


def quantization_skip(config: Any) -> list[str] | None:
    """``llm_int8_skip_modules`` for loading this checkpoint in 4 bits: a multimodal one keeps
    :data:`UNQUANTIZED` (or its own published list) in 16 bits; ``None``: transformers' default rules."""
    if not is_multimodal(config):
        return None
    quant = (config.get("quantization_config") if isinstance(config, dict)
             else getattr(config, "quantization_config", None))
    if isinstance(quant, dict) and quant.get("llm_int8_skip_modules"):
        return bnb_skip_modules(quant["llm_int8_skip_modules"])
    return bnb_skip_modules(UNQUANTIZED)


def adapted_non_language(model: Any) -> list[str]:
    """Names of modules under :data:`NON_LANGUAGE` that carry a LoRA/DoRA weight (should be none)."""
    return sorted(name for name, module in model.named_modules()
                  if any(part in NON_LANGUAGE for part in name.split("."))
                  and (hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})) > 0))


def check_language_only(model: Any) -> None:
    """Raise :class:`AdapterPlacementError` if an adapter landed on the vision tower or projector."""
    from trinity_core.errors import AdapterPlacementError

    found = adapted_non_language(model)
    if found:
        raise AdapterPlacementError(f"{len(found)} vision-tower/projector modules got a LoRA adapter: {found[:5]}",
                                    details={"modules": found})


def quantized_load(name_or_path: str, revision: str | None, *, load_in_4bit: bool, quant_type: str,
                   double_quant: bool, dtype: Any) -> dict[str, Any]:
    """``config=`` and ``quantization_config=`` for ``from_pretrained``, the same for training and the
    report. A pre-quantised checkpoint keeps its own 4-bit settings but computes in ``dtype`` (the
    published bf16 is slow or missing on CPU and T4) and, when multimodal, its skip list is given in
    names transformers 5 matches (else it builds ``Linear4bit`` shells around the 16-bit vision
    weights). A 16-bit one is quantised on load, its vision tower and projector left alone."""
    from transformers import AutoConfig, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    skip = quantization_skip(config)
    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        stored = dict(stored if isinstance(stored, dict) else stored.to_dict())
        stored["bnb_4bit_compute_dtype"] = str(dtype).removeprefix("torch.")
        if skip:
            stored["llm_int8_skip_modules"] = skip
        config.quantization_config = stored
        return {"config": config, "quantization_config": None}
    if not load_in_4bit:
        return {"config": config, "quantization_config": None}
    return {"config": config, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)}
