"""The published Gemma-3-12B-it layout end to end on its tiny stand-in, 16-bit and pre-quantised:
layout = the published files, LoRA on the language model only, merge keeps the vision tower and
projector, GGUF text model + vision projector (mmproj) that llama.cpp loads together."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.export.export_helpers import FIDELITY
from trinity_core.train.backends.common import NON_LANGUAGE
from trinity_core.export.merge import QUANT_SUFFIXES, shard_files
from trinity_core.fixtures.tiny_multimodal import (PUBLISHED_4BIT, PUBLISHED_16BIT, VISION_SHAPES, build_multimodal_model,
                                          published_config)

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("16bit", "4bit")
PUBLISHED_PREFIXES = ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")


LOGITS_CHECK = """
import json, sys
import torch
from transformers import AutoTokenizer
from tests.export.export_helpers import hf_logits
from trinity_core.evaluate.run import load_merged_model, load_trained_model
base, workdir = sys.argv[1], sys.argv[2]
trained = load_trained_model(base, workdir + "/adapter", compute_dtype=torch.float32)
merged = load_merged_model(workdir + "/merged")
tok = AutoTokenizer.from_pretrained(workdir + "/merged")
text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}], tokenize=False,
                               add_generation_prompt=True)
ids = tok(text, add_special_tokens=False)["input_ids"] + list(range(20, 44))
t, m = hf_logits(trained, ids), hf_logits(merged, ids)
with trained.disable_adapter():
    b = hf_logits(trained, ids)
print(json.dumps({"diff": (t - m).abs().max().item(), "effect": (t - b).abs().max().item()}))
"""


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in shard_files(model_dir):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _module(key: str) -> str:
    for suffix in QUANT_SUFFIXES:
        key = key.removesuffix("." + suffix)
    return key


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Both stand-ins, built once (the 16-bit one sharded, so it has an index like the published)."""
    root = tmp_path_factory.mktemp("gemma3-mm")
    return {"16bit": build_multimodal_model(root / "16bit", max_shard_size="5MB"),
            "4bit": build_multimodal_model(root / "4bit", quantized=True)}


@pytest.fixture(scope="session")
def mm_runs(stand_ins, tmp_path_factory) -> dict[str, tuple]:
    """``run_job`` on each stand-in: 3 training steps, merge, GGUF f16 + q4_k_m + mmproj, manifest."""
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec

    runs = {}
    for variant, base in stand_ins.items():
        spec = load_spec(ROOT / "examples" / "tiny.yaml")
        spec.model.name_or_path = str(base)
        spec.train.max_steps, spec.train.save_steps, spec.train.learning_rate = 3, 3, 0.01
        spec.export.evaluate = False  # the logits are compared below, on the models themselves
        workdir = tmp_path_factory.mktemp(f"mm-run-{variant}")
        runs[variant] = (run_job(spec, workdir), workdir, spec)
    return runs


# --------------------------------------------------------------------------- 1. layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_has_the_published_keys(stand_ins, variant):
    config = json.loads((stand_ins[variant] / "config.json").read_text())
    published = published_config(PUBLISHED_4BIT if variant == "4bit" else PUBLISHED_16BIT)
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] == published["architectures"]
    assert set(published) <= set(config)
    for part in ("text_config", "vision_config"):
        assert set(published[part]) <= set(config[part]), part
    assert config["text_config"]["rope_scaling"] == published["text_config"]["rope_scaling"]
    if variant == "4bit":
        q, pq = config["quantization_config"], published["quantization_config"]
        assert set(q) == set(pq) and q["llm_int8_skip_modules"] == pq["llm_int8_skip_modules"]
        assert {k: v for k, v in q.items() if k != "bnb_4bit_compute_dtype"} == \
            {k: v for k, v in pq.items() if k != "bnb_4bit_compute_dtype"}
    else:
        assert "quantization_config" not in config
    # the token ids point at Gemma's image tokens; the processor agrees with the config
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(stand_ins[variant])
    tok = processor.tokenizer
    assert type(processor).__name__ == "Gemma3Processor"
    assert tok.convert_ids_to_tokens([config["boi_token_index"], config["eoi_token_index"],
                                      config["image_token_index"]]) == \
        ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    assert processor.image_seq_length == config["mm_tokens_per_image"] == VISION_SHAPES["tiny"]["mm_tokens_per_image"]
    assert processor.image_processor.size["height"] == config["vision_config"]["image_size"]
    eos = config["eos_token_id"]  # Google: [<eos>, <end_of_turn>]; Unsloth: <end_of_turn>
    assert tok.convert_tokens_to_ids("<end_of_turn>") in (eos if isinstance(eos, list) else [eos])
    files = {p.name for p in stand_ins[variant].iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "added_tokens.json",
            "chat_template.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= files


def test_tensor_names_are_the_published_ones(stand_ins):
    names = {v: _tensors(stand_ins[v]) for v in VARIANTS}
    index = json.loads((stand_ins["16bit"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(names["16bit"])
    for tensors in names.values():
        assert all(k.startswith(PUBLISHED_PREFIXES) for k in tensors), [k for k in tensors
                                                                         if not k.startswith(PUBLISHED_PREFIXES)]
        assert "multi_modal_projector.mm_input_projection_weight" in tensors
        assert "vision_tower.vision_model.post_layernorm.weight" in tensors
        assert not any("lm_head" in k for k in tensors)  # tied to the embedding, as published
    # the 4-bit checkpoint: the same modules; language-model projections packed with their quant
    # state, vision tower, projector, norms and embedding stored as they are in the 16-bit one
    assert {_module(k) for k in names["4bit"]} == set(names["16bit"])
    packed = {k.removesuffix(".quant_state.bitsandbytes__nf4") for k in names["4bit"] if k.endswith("nf4")}
    assert packed and all(k.startswith("language_model.model.layers.") and k.endswith("_proj.weight") for k in packed)
    assert len(packed) == 42
    for key, value in names["4bit"].items():
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(value, names["16bit"][key]), key


def test_the_16bit_stand_in_sees_an_image(stand_ins):
    """Its vision tower and projector are wired as in Gemma-3: an image changes the text logits."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(stand_ins["16bit"])
    model = Gemma3ForConditionalGeneration.from_pretrained(stand_ins["16bit"]).eval()
    images = [Image.fromarray((np.random.default_rng(s).random((112, 112, 3)) * 255).astype("uint8")) for s in (0, 1)]
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    text = processor.apply_chat_template([turn], add_generation_prompt=True)
    logits = []
    for image in images:
        batch = processor(text=text, images=[image], return_tensors="pt")
        assert (batch["input_ids"] == model.config.image_token_index).sum() == model.config.mm_tokens_per_image
        with torch.no_grad():
            logits.append(model(**batch).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_cli_writes_the_stand_in(tmp_path):
    from cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--multimodal", "--prequantized", "--layers", "2",
                 "--vision-layers", "1"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 2 and config["vision_config"]["num_hidden_layers"] == 1
    assert config["quantization_config"]["load_in_4bit"]


# --------------------------------------------------------------------------- 2. training


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_is_on_the_language_model_only(mm_runs, variant):
    from safetensors.torch import load_file

    result, workdir, _ = mm_runs[variant]
    assert result.status == "succeeded" and result.global_step == 3
    keys = load_file(workdir / "adapter" / "adapter_model.safetensors").keys()
    modules = {k.split(".lora_")[0] for k in keys}
    assert len(modules) == 42  # 7 projections x 6 layers
    assert all(".language_model.layers." in m for m in modules)
    assert not [k for k in keys if any(p in k for p in NON_LANGUAGE)]


def test_an_adapter_on_the_vision_tower_is_refused(stand_ins):
    """Without the exclusion the 7 names reach SigLIP too (as they did before): the check raises."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    from trinity_core.train.backends.common import adapted_non_language, check_language_only
    from trinity_core.errors import AdapterPlacementError

    model = Gemma3ForConditionalGeneration.from_pretrained(stand_ins["16bit"])
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert any("vision_tower" in m for m in adapted_non_language(model))
    with pytest.raises(AdapterPlacementError, match="vision-tower/projector"):
        check_language_only(model)


# --------------------------------------------------------------------------- 3. merge


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_model_keeps_the_vision_tower_and_reproduces_the_trained_model(mm_runs, stand_ins, variant):
    from transformers import Gemma3ForConditionalGeneration

    from trinity_core.evaluate.run import load_merged_model

    result, workdir, spec = mm_runs[variant]
    merged_dir = workdir / "merged"
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert (merged_dir / "preprocessor_config.json").is_file() and (merged_dir / "processor_config.json").is_file()
    merged, base = _tensors(merged_dir), _tensors(stand_ins[variant])
    assert set(merged) == {_module(k) for k in base}  # published names, nothing dropped or added
    # vision tower + projector: the base's stored tensors, bit for bit (for the 4-bit base those are
    # its unquantised 16-bit tensors; only the language model was packed)
    vision = [k for k in merged if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(torch.equal(merged[k], base[k]) for k in vision)
    info = result.export["merge"]
    assert info["merged"] == 42 and (info["dequantized"], info["requantized"]) == ((42, 0) if variant == "4bit"
                                                                                   else (0, 42))

    model = load_merged_model(merged_dir)
    assert isinstance(model, Gemma3ForConditionalGeneration)
    del model
    # The logits check runs in a fresh process, as a user loads the artifacts: in the process that
    # trained, a 4-bit model + adapter loaded afterwards computes differently (max |Δ| ~0.3 here; the
    # text-only tiny pipeline's report shows it too: fine-tuned vs merged perplexity 68.6 vs 65.7).
    check = subprocess.run([sys.executable, "-c", LOGITS_CHECK, spec.model.name_or_path, str(workdir)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert check.returncode == 0, check.stderr[-3000:]
    numbers = json.loads(check.stdout.strip().splitlines()[-1])
    FIDELITY[f"multimodal_{variant}_merge_max_abs"] = diff = numbers["diff"]
    assert numbers["effect"] > 0.01, "the adapter should change the model, or this test proves nothing"
    assert diff < 1e-4


# --------------------------------------------------------------------------- 4. GGUF


@pytest.mark.parametrize("variant", VARIANTS)
def test_projector_gguf_is_in_the_manifest_and_readable(mm_runs, variant):
    from trinity_core.export.gguf import check_mmproj

    result, workdir, _ = mm_runs[variant]
    rows = {r["name"]: r for r in json.loads((workdir / "artifacts.json").read_text())}
    assert rows["mmproj-f16.gguf"]["kind"] == "mmproj" and rows["model-q4_k_m.gguf"]["kind"] == "gguf"
    assert result.export["mmproj"] == "gguf/mmproj-f16.gguf" and "mmproj" not in result.export["gguf"]
    info = check_mmproj(workdir / "gguf" / "mmproj-f16.gguf", vision_layers=VISION_SHAPES["tiny"]["num_hidden_layers"])
    assert info["projector_tensors"] == ["mm.input_projection.weight", "mm.soft_emb_norm.weight"]
    assert info["image_size"] == VISION_SHAPES["tiny"]["image_size"]
    modelfile = (workdir / "gguf" / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ./model-q4_k_m.gguf", "FROM ./mmproj-f16.gguf"]


def test_llama_cpp_completes_a_chat_and_sees_an_image_with_the_pair(mm_runs):
    """q4_k_m completes a text chat; llama.cpp's multimodal loader (mtmd) takes the projector,
    encodes an image into ``mm_tokens_per_image`` embeddings and the model answers after it."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    _, workdir, _ = mm_runs["4bit"]
    gguf = workdir / "gguf"
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((112, 112, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = MTMDChatHandler(clip_model_path=str(gguf / "mmproj-f16.gguf"), verbose=False, use_gpu=False)
    llm = Llama(model_path=str(gguf / "model-q4_k_m.gguf"), chat_handler=handler, n_ctx=256, n_threads=1,
                verbose=False)
    try:
        text = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of Peru?"}],
                                          max_tokens=6, temperature=0)
        seen = llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is the capital of Peru?"}]}], max_tokens=6, temperature=0)
    finally:
        llm.close()
    assert text["usage"]["completion_tokens"] > 0 and text["choices"][0]["message"]["content"] is not None
    # <start_of_image> + 4 image embeddings + <end_of_image> (+ the separators the template adds)
    extra = seen["usage"]["prompt_tokens"] - text["usage"]["prompt_tokens"]
    assert extra >= VISION_SHAPES["tiny"]["mm_tokens_per_image"] + 2
    assert seen["usage"]["completion_tokens"] > 0
