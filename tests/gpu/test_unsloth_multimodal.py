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


@pytest.mark.parametrize("quantized", [True, False], ids=["prequantized-4bit", "16bit"])
def test_unsloth_trains_the_language_model_only(tmp_path, quantized):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from trinity_core.export.merge import shard_files
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
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").keys()
    modules = {k.split(".lora_")[0] for k in keys}
    assert len(modules) == 42 and not [k for k in keys if any(p in k for p in NON_LANGUAGE)]

    def vision(model_dir: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in shard_files(model_dir):
            with safe_open(str(shard), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if any(p in k for p in NON_LANGUAGE)})
        return out

    report = result.report
    checked = report["merged_weights"]
    assert checked["ok"], {k: checked.get(k) for k in ("mismatches", "missing_adapted", "rounded_at_load", "max_abs_diff")}
    assert report["memory"]["within_training_peak"], report["memory"]
    before, after = vision(base), vision(tmp_path / "run" / "merged")
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
