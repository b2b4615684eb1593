"""What both backends share: dtype choice and the LoRA config."""

from __future__ import annotations

from typing import Any

from trinity_core.spec import JobSpec


def compute_dtype(spec: JobSpec) -> Any:
    """``auto``: bf16 where the GPU supports it, fp16 on older GPUs (T4), fp32 on CPU."""
    import torch

    name = spec.model.compute_dtype
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


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
