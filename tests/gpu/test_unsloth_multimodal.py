"""GPU-only: the Unsloth backend on the multimodal stand-in (the published checkpoint's layout,
16-bit and pre-quantised 4-bit): a Gemma3Processor comes back instead of a tokenizer, LoRA stays on
the language model, and the merged model's vision tower and projector equal the base's (the GGUF
pair is exported by the CPU suite: llama.cpp is not on the GPU machine). Named to sort after
test_unsloth.py, whose plain-PEFT test must run before unsloth is imported. Run on the lent GPU:

    PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu/test_unsloth_multimodal.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (gpu extra)")]
ROOT = Path(__file__).resolve().parents[2]
NON_LANGUAGE = ("vision_tower", "multi_modal_projector")


def vision_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The vision tower's and projector's tensors of a saved model."""
    from safetensors import safe_open

    from trinity_core.export.merge import shard_files

    out = {}
    for shard in shard_files(model_dir):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if any(p in k for p in NON_LANGUAGE)})
    return out


def load_adapter_keys(workdir: Path) -> list[str]:
    from safetensors.torch import load_file

    return list(load_file(workdir / "adapter" / "adapter_model.safetensors").keys())


@pytest.mark.parametrize("quantized", [True, False], ids=["prequantized-4bit", "16bit"])
def test_unsloth_trains_the_language_model_only(tmp_path, quantized):
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

    base = build_multimodal_model(tmp_path / "base", quantized=quantized)
    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    spec.model.name_or_path, spec.model.backend = str(base), "unsloth"
    spec.train.max_steps, spec.train.save_steps = 4, 4
    spec.export.gguf = False  # llama.cpp is not carried by default; the CPU suite exports the GGUF pair
    spec.model.compute_dtype = "float16"  # the T4 path (Unsloth computes Gemma-3 in fp32), evaluate after it
    result = run_job(spec, tmp_path / "run")
    assert result.backend["backend"] == "unsloth" and result.global_step == 4
    losses = [h["loss"] for h in result.loss_history]
    assert all(x == x for x in losses)
    keys = load_adapter_keys(tmp_path / "run")
    modules = {k.split(".lora_")[0] for k in keys}
    assert len(modules) == 42 and not [k for k in keys if any(p in k for p in NON_LANGUAGE)]

    report = result.report
    checked = report["merged_weights"]
    assert checked["ok"], {k: checked.get(k) for k in ("mismatches", "missing_adapted", "rounded_at_load", "max_abs_diff")}
    assert report["memory"]["within_training_peak"], report["memory"]
    before, after = vision_tensors(base), vision_tensors(tmp_path / "run" / "merged")
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(), reason="needs bf16")
@pytest.mark.parametrize("dora", [True, False], ids=["fast-dora", "lora"])
def test_the_bf16_path_compiles_the_text_layers_only(tmp_path, dora):
    """The recipe's path on a bf16 GPU (an H100's, not the T4's) on the published checkpoint's layout, pre-quantised:
    Trinity's compiled decoder layers for the language model's 6 Gemma3DecoderLayers (fast DoRA inside, or a LoRA
    job's: backends/unsloth.trinity_layers_for reads the multimodal config's text_config), the dense attention
    and block masks, the vision tower and projector untouched in the merged model. A fresh process without
    UNSLOTH_COMPILE_DISABLE, as the worker's."""
    from tests.helpers import run_job_as_the_worker
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model
    from trinity_core.spec import load_spec

    base = build_multimodal_model(tmp_path / "base", quantized=True)
    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    spec.model.name_or_path, spec.model.backend, spec.model.compute_dtype = str(base), "unsloth", "bfloat16"
    spec.lora.use_dora = dora
    spec.train.max_steps, spec.train.save_steps = 6, 6
    spec.export.gguf = False  # llama.cpp is not carried by default; the CPU suite exports the GGUF pair
    # the evaluation's text metrics need rouge_score, carried in .gpu-extra (bench/gpu_extra.sh); without it the
    # merged model's weights are not checked against base + adapter here (the vision tensors still are)
    spec.export.evaluate = importlib.util.find_spec("rouge_score") is not None
    out = run_job_as_the_worker(spec, tmp_path / "run", tmp_path)
    info = out["backend"]
    assert info["unsloth_compile"] is False, info
    assert info["compiled_kernels"]["decoder_layers"] == 6, info
    assert info["compiled_kernels"]["dense_attention"] and info["compiled_kernels"]["block_masks"], info
    if importlib.util.find_spec("cudnn") is not None and torch.cuda.get_device_capability()[0] == 9:
        assert info["compiled_kernels"]["sliding_attention"] == "cudnn", info  # cudnn-frontend carried: its band
    assert info["fast_dora_layers"] == (42 if dora else 0), info
    losses = out["loss"]
    assert len(losses) == 6 and all(x == x for x in losses) and losses[-1] < losses[0], losses
    assert out["merged_weights"] or (out["merged_weights"] is None and not spec.export.evaluate), out
    keys = load_adapter_keys(tmp_path / "run")
    assert len({k.split(".lora_")[0] for k in keys}) == 42 and not [k for k in keys if any(p in k for p in NON_LANGUAGE)]
    before, after = vision_tensors(base), vision_tensors(tmp_path / "run" / "merged")
    assert before and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
