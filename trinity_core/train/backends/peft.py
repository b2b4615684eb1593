"""transformers + bitsandbytes 4-bit NF4 + PEFT (LoRA, rsLoRA, DoRA). CPU and any GPU.

A Gemma3ForConditionalGeneration (the published Gemma-3-12B-it) loads whole, its vision tower and
projector unquantised as the pre-quantised checkpoint stores them, and gets adapters on its language
model only (checked after ``get_peft_model``).
"""

from __future__ import annotations

from typing import Any

from trinity_core import gpu, nf4
from trinity_core.options import RunOptions
from trinity_core.train.backends.common import (EXCLUDE_NON_LANGUAGE, check_language_only, compute_dtype, is_multimodal,
                                          lora_kwargs, quantized_load)
from trinity_core.spec import JobSpec


class PeftBackend:
    name = "peft"

    def __init__(self, options: RunOptions | None = None) -> None:
        self._info: dict[str, Any] = {}
        self.options = options or RunOptions()

    def load(self, spec: JobSpec, tokenizer: Any = None) -> tuple[Any, Any]:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trinity_core.train.fast_dora import enable_fast_dora

        dtype = compute_dtype(spec)
        load = quantized_load(spec.model.name_or_path, spec.model.revision, load_in_4bit=spec.model.load_in_4bit,
                              quant_type=spec.model.quant_type, double_quant=spec.model.double_quant, dtype=dtype)
        quantized = load["quantization_config"] is not None or hasattr(load["config"], "quantization_config")
        device_map = {"": torch.cuda.current_device()} if gpu.available() else None
        model = AutoModelForCausalLM.from_pretrained(
            spec.model.name_or_path,
            revision=spec.model.revision,
            **load,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=(spec.model.attention if spec.model.attention != "auto"
                                 else "sdpa" if gpu.available() else "eager"),
        )
        if quantized and device_map is None:
            nf4.exact_on_cpu(model)  # bitsandbytes' AVX-512 CPU paths: bf16 switch, misread widths
        # A multimodal checkpoint's directory holds its processor; the text tokenizer is in it.
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(spec.model.name_or_path, revision=spec.model.revision)
        model.config.use_cache = False
        if spec.model.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, and unlike
            # prepare_model_for_kbit_training it does not upcast the (tied, 1B-parameter) embedding.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(spec.train.seed)
        lora = lora_kwargs(spec)
        if is_multimodal(model.config):  # the 7 names also exist in SigLIP: LoRA on the language model only
            lora["exclude_modules"] = EXCLUDE_NON_LANGUAGE
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        check_language_only(model)
        self._info = {"backend": self.name, "compute_dtype": str(dtype).removeprefix("torch."),
                      "device": "cuda" if gpu.available() else "cpu",
                      "fast_dora_layers": enable_fast_dora(model) if spec.lora.use_dora and self.options.fast_dora else 0}
        return model, tokenizer

    def info(self) -> dict[str, Any]:
        return dict(self._info)
