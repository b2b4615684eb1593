"""Unsloth's FastLanguageModel, quarantined: imported lazily, here only, in the worker process.

Unsloth patches transformers and TRL globally and must be imported before them. Its torch.compile
mode is 1.34x faster with LoRA after a ~58 s first step, but with PEFT's DoRA it stalled for over
3 minutes and once crashed (H100 measurements in ../docs/BENCHMARKS.md), so compile is disabled
when DoRA is on, unless ``RunOptions.unsloth_compile`` says otherwise. It is disabled for LoRA too where
Trinity's compiled decoder layers run the job instead (:func:`trinity_layers_for`: a bf16 GPU, a 4-bit Gemma-3,
``RunOptions.compiled_layers``; 1.070x Unsloth's compiled LoRA at 48 layers of the 12B's shape and layer pattern, H200,
call 54, docs/BENCHMARKS.md). The choice is made once per process: Unsloth reads ``UNSLOTH_COMPILE_DISABLE`` at
import, so it is set here, before the import (its only switch; trinity_core writes no other environment
variable).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from trinity_core.train.backends.common import check_language_only, compute_dtype, lora_kwargs
from trinity_core.options import RunOptions
from trinity_core.spec import JobSpec

COMPILE_ENV = "UNSLOTH_COMPILE_DISABLE"


class UnslothBackend:
    name = "unsloth"

    def __init__(self, spec: JobSpec, options: RunOptions | None = None) -> None:
        """Imports Unsloth now, so that it comes before the pipeline's transformers/TRL imports."""
        self._info: dict[str, Any] = {}
        self.options = options or RunOptions()
        compile_ = self.options.unsloth_compile
        if "unsloth" not in sys.modules:
            if compile_ is None and (spec.lora.use_dora or trinity_layers_for(spec, self.options)):
                compile_ = False
            if compile_ is not None:
                os.environ[COMPILE_ENV] = "0" if compile_ else "1"
        import unsloth  # noqa: F401

    def load(self, spec: JobSpec, tokenizer: Any = None) -> tuple[Any, Any]:
        """``tokenizer`` is not used: FastLanguageModel loads (and patches) its own."""
        from unsloth import FastLanguageModel

        dtype = compute_dtype(spec)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=spec.model.name_or_path,
            revision=spec.model.revision,
            max_seq_length=spec.model.max_seq_length,
            load_in_4bit=spec.model.load_in_4bit,
            dtype=dtype,
            **({"attn_implementation": spec.model.attention} if spec.model.attention != "auto" else {}),
        )
        # For a Gemma3ForConditionalGeneration Unsloth returns its Gemma3Processor here; training and
        # the data stage want the text tokenizer inside it.
        from transformers import ProcessorMixin

        if isinstance(tokenizer, ProcessorMixin):
            tokenizer = tokenizer.tokenizer
        # FastLanguageModel's get_peft_model with the 7 projection names adapts the language model
        # only (H200, FACTS.md); FastModel's default filters would also adapt the vision tower.
        model = FastLanguageModel.get_peft_model(
            model,
            use_gradient_checkpointing="unsloth" if spec.model.gradient_checkpointing else False,
            random_state=spec.train.seed,
            max_seq_length=spec.model.max_seq_length,
            **lora_kwargs(spec),
        )
        check_language_only(model)
        from trinity_core.train.fast_dora import enable_fast_dora
        from trinity_core.train.lean_norm import patch_gemma3_norms

        fast_dora_layers = enable_fast_dora(model) if spec.lora.use_dora and self.options.fast_dora else 0
        lean_norms = patch_gemma3_norms(model)  # Unsloth's float32 mode (the T4 path) only, as is the next
        lean_attention = patch_lean_attention(model) if self.options.lean_attention else 0
        compiled = os.environ.get(COMPILE_ENV, "0") not in ("1", "true", "True")
        layers = self.options.compiled_layers and (fast_dora_layers > 0 or not spec.lora.use_dora)
        kernels = (compile_gemma3_kernels(model, layers=layers)
                   if self.options.compiled_kernels and not compiled else {})
        self._info = {
            "backend": self.name,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "device": "cuda",
            "unsloth_compile": compiled,
            "unsloth_compile_reason": _compile_reason(  # forced on: not "imported too early"
                spec.lora.use_dora, compiled,
                self.options.unsloth_compile is not True and trinity_layers_for(spec, self.options)),
            "fast_dora_layers": fast_dora_layers,
            "lean_norms": lean_norms,
            "lean_attention": lean_attention,
            "compiled_kernels": kernels,
        }
        return model, tokenizer

    def info(self) -> dict[str, Any]:
        return dict(self._info)


def patch_lean_attention(model) -> int:
    """``trinity_core.train.lean_attention`` on ``model`` with Unsloth's own SDPA dispatch (k and v
    repeated for the efficient kernel where it takes no grouped heads) and mask builder, so the
    recomputed core picks the kernels Unsloth's forward picks. 0 outside Unsloth's float32 mode, and
    where those helpers moved (a newer unsloth_zoo): then Unsloth's attention runs as it is."""
    import torch

    from trinity_core.train.lean_attention import patch_gemma3_attention
    from trinity_core.train.lean_norm import float32_mode

    if not float32_mode():
        return 0
    try:
        from unsloth_zoo.temporary_patches.gemma import _prepare_gemma3_sdpa_attention_mask
        from unsloth_zoo.temporary_patches.sdpa_gqa import make_gqa_sdpa
    except ImportError:
        return 0
    sdpa = make_gqa_sdpa(torch.compiler.disable(torch.nn.functional.scaled_dot_product_attention, recursive=True))
    return patch_gemma3_attention(model, sdpa, _prepare_gemma3_sdpa_attention_mask)


BLOCK_MASKS = True
"""Flex attention's block masks cached by shape (:mod:`trinity_core.train.block_masks`); False for the A/B
(``bench/gpu_bench.py --no-block-masks``)."""


LORA_LAYERS = True
"""A LoRA job on a bf16 GPU runs Trinity's compiled decoder layers with Unsloth's compile off
(:func:`trinity_layers_for`); False: Unsloth's compile mode for LoRA, as until 2026-11-30 (also
``RunOptions(unsloth_compile=True)`` for one job, where the process has not imported Unsloth yet)."""


DENSE_ATTENTION = True
"""With the compiled decoder layers and the mask cache: plain masks' attention through torch's dense kernels
(:mod:`trinity_core.train.dense_attention`); False for the A/B (``bench/gpu_bench.py --no-dense-attention``)."""


def compile_gemma3_kernels(model, layers: bool = False) -> dict:
    """On the bf16 path with Unsloth's compile mode off (DoRA): Gemma-3's norms and the attention's prepare
    (q/k norm, RoPE) compiled (``trinity_core.train.compiled_kernels``), as that mode compiles them. The norms
    per module; the prepare inside Unsloth's ``Gemma3Attention.forward``, where it is a closure variable of
    its bf16 forward (unsloth_zoo's ``patch_Gemma3Attention_generic``): swapped there, for every Gemma-3
    attention of the process (the same arithmetic as Unsloth's). ``layers``: also each decoder layer as one
    compiled region, fast DoRA inside (``trinity_core.train.compiled_layers``); flex attention's block masks
    built once a shape (``trinity_core.train.block_masks``, :data:`BLOCK_MASKS`) and, with both, the plain masks'
    attention through dense kernels (``trinity_core.train.dense_attention``, :data:`DENSE_ATTENTION`; with it,
    ``sliding_attention``: the sliding layers' kernel, or flex attention and why). What was
    installed; nothing in Unsloth's float32 mode (the T4 path has its own lean norm and attention) or without CUDA."""
    import torch

    from trinity_core.train import block_masks, compiled_kernels, dense_attention
    from trinity_core.train.compiled_layers import compile_decoder_layers
    from trinity_core.train.lean_norm import float32_mode

    if float32_mode() or not torch.cuda.is_available():
        return {}
    installed = {"norms": compiled_kernels.install_compiled_norms(model), "attention_prepare": _swap_unsloth_prepare(),
                 "decoder_layers": compile_decoder_layers(model) if layers else 0,
                 "block_masks": BLOCK_MASKS and block_masks.install() is not None,
                 "dense_attention": (layers and BLOCK_MASKS and DENSE_ATTENTION
                                     and dense_attention.install() is not None)}
    if installed["dense_attention"]:  # cuDNN's band, or flex attention and why
        installed["sliding_attention"] = dense_attention.sliding_kernel()
    return installed


def _swap_unsloth_prepare() -> bool:
    """Replace the ``prepare`` closure variable of Unsloth's Gemma-3 attention forward by
    :func:`_compiled_prepare`; False where it is not found (another unsloth_zoo: Unsloth's forward then runs
    as it is)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention

    from trinity_core.train.compiled_kernels import find_closure_cell

    cell = find_closure_cell(Gemma3Attention.forward, "prepare")
    if cell is None or not callable(getattr(cell, "cell_contents", None)):
        return False
    cell.cell_contents = _compiled_prepare
    return True


def _compiled_prepare(hidden_states, q16, k16, v16, q_shape, kv_shape, position_embeddings, attention_mask,
                      q_norm, k_norm):
    """unsloth_zoo's bf16 ``prepare`` (same arguments and results) through the compiled
    ``compiled_kernels.qkv_heads``: q, k, v to contiguous heads, q and k normed and rotated; cos, sin; the mask
    in q's dtype unless boolean."""
    import torch

    from trinity_core.train.compiled_kernels import kernels

    if not (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2):
        raise ValueError("Position embeddings not provided as (cos, sin) tuple to Gemma3Attention")
    cos, sin = position_embeddings
    q, k, v = kernels().qkv_heads(q16, k16, v16, cos, sin, q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps,
                                   q_shape[2], kv_shape[2])
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(q.dtype)
    return q, k, v, cos, sin, attention_mask


def trinity_layers_for(spec: JobSpec, options: RunOptions) -> bool:
    """Whether a LoRA job of ``spec`` runs in Trinity's compiled decoder layers rather than Unsloth's compile
    mode: ``RunOptions.compiled_kernels`` and ``compiled_layers`` (and :data:`LORA_LAYERS`), a CUDA GPU with bf16
    and the spec's compute dtype resolving to it (not the T4 path: Unsloth's float32 mode compiles nothing of
    ours), a 4-bit base, and a model whose decoder layers ``train/compiled_layers`` compiles (Gemma-3: the
    model type in its config.json, read from the model's directory or the hub cache as JSON, so nothing imports
    transformers before Unsloth). A model whose config cannot be read keeps Unsloth's compile."""
    import torch

    from trinity_core import gpu, model_config
    from trinity_core.train.memory import COMPILED_LAYER_MODELS

    if not (LORA_LAYERS and options.compiled_kernels and options.compiled_layers and spec.model.load_in_4bit
            and gpu.bf16_supported() and gpu.compute_dtype(spec.model.compute_dtype) == torch.bfloat16):
        return False
    try:
        data = model_config.resolve(spec.model.name_or_path, spec.model.revision).data
    except Exception:  # noqa: BLE001 - unreadable: keep Unsloth's compile, the fallback that always worked
        return False
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    return str(text.get("model_type", data.get("model_type", ""))) in COMPILED_LAYER_MODELS


def _compile_reason(dora: bool, compiled: bool, trinity_layers: bool = False) -> str:
    if dora:
        return (f"DoRA on, but compiled: unsloth was imported before {COMPILE_ENV} could be set"
                if compiled else "DoRA on: compile disabled")
    if compiled:
        return (f"LoRA: compiled (unsloth was imported before {COMPILE_ENV} could be set)" if trinity_layers
                else "LoRA: compiled")
    return "LoRA: Trinity's compiled layers instead" if trinity_layers else f"{COMPILE_ENV} set"
