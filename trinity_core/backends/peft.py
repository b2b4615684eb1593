"""transformers + bitsandbytes 4-bit NF4 + PEFT (LoRA, rsLoRA, DoRA). CPU and any GPU."""

from __future__ import annotations

from typing import Any

from trinity_core.backends.common import compute_dtype, lora_kwargs
from trinity_core.spec import JobSpec


class PeftBackend:
    name = "peft"

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}

    def load(self, spec: JobSpec) -> tuple[Any, Any]:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from trinity_core.qdora import enable_fast_dora

        dtype = compute_dtype(spec)
        quant = None
        if spec.model.load_in_4bit:
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=spec.model.quant_type,
                bnb_4bit_use_double_quant=spec.model.double_quant,
                bnb_4bit_compute_dtype=dtype,
            )
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        model = AutoModelForCausalLM.from_pretrained(
            spec.model.name_or_path,
            revision=spec.model.revision,
            quantization_config=quant,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=(spec.model.attention if spec.model.attention != "auto"
                                 else "sdpa" if torch.cuda.is_available() else "eager"),
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.model.name_or_path, revision=spec.model.revision)
        model.config.use_cache = False
        if spec.model.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, and unlike
            # prepare_model_for_kbit_training it does not upcast the (tied, 1B-parameter) embedding.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(spec.train.seed)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(spec)))
        self._info = {"backend": self.name, "compute_dtype": str(dtype).removeprefix("torch."),
                      "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "fast_dora_layers": enable_fast_dora(model) if spec.lora.use_dora else 0}
        return model, tokenizer

    def info(self) -> dict[str, Any]:
        return dict(self._info)
