"""A random Gemma3ForConditionalGeneration in the layout of the published Gemma-3-12B-it checkpoints.

The recipe's default model, ``unsloth/gemma-3-12b-it-bnb-4bit``, is a Gemma-3 text model plus a SigLIP
vision tower and a multimodal projector, pre-quantised with bitsandbytes; ``google/gemma-3-12b-it``
is the same model in 16 bits. :func:`build_multimodal_model` writes a stand-in for either, small
(``text_shape="tiny"``, ``vision_shape="tiny"``: CPU tests) or at the real sizes (``"12b"``,
``"siglip-so400m"``: GPU runs, any number of text layers), taken from the published files:

* ``config.json``: the published config (``assets/model_configs/<id>.json``, shipped for the memory
  estimate) with the shape, token ids and dtype replaced: the same keys (``architectures``,
  ``text_config``, ``vision_config``, ``boi/eoi/image_token_index``, ``mm_tokens_per_image``,
  ``rope_scaling``, ``sliding_window``...; the 4-bit one with its ``quantization_config`` and
  ``llm_int8_skip_modules``). Google's short config leaves sizes at transformers' defaults (vocab
  262208, head_dim 256...); the stand-in's ``text_config`` adds the size keys it changes.
* weights under the published names: ``language_model.model.*``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.*`` (what Google's conversion script writes; transformers 5.17 writes a
  freshly built model's SigLIP as ``vision_tower.*`` without ``vision_model``, so keys are renamed).
  The 4-bit variant is the 16-bit one loaded by bitsandbytes (NF4, double quant) with the published
  skip list, saved: packed ``uint8`` weights + ``absmax``/``quant_map``/``nested_*``/``quant_state``
  for the language model's projections, vision tower, projector and embeddings unquantised.
* the processor as published (transformers 4.50 era): ``preprocessor_config.json`` (Gemma3ImageProcessor,
  mean/std 0.5, bilinear, ``image_seq_length`` = ``mm_tokens_per_image``), ``processor_config.json``,
  ``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.json`` (+ transformers 5's
  ``chat_template.jinja``), ``generation_config.json``, and the tokenizer of :mod:`trinity_core.tiny`
  with Gemma's image tokens (:func:`trinity_core.tiny.build_tokenizer`, ``image_tokens=True``).

Not confirmed (the repositories are gated or were not readable here; see also
``assets/model_configs/README.md``): the unsloth checkpoint's exact ``llm_int8_skip_modules`` and
which tensors its safetensors index lists (taken as: what transformers writes for a bnb-4bit
Gemma-3 with that skip list; no ``lm_head``, it is tied); the byte content of the published
tokenizer/processor files (their keys and line counts were seen in the repositories' commit pages,
their values in Google's conversion script). Token ids are the tiny tokenizer's (``<image_soft_token>``
= its SentencePiece size, as 262144 is Gemma's); only the names and their relations matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trinity_core import tiny

PUBLISHED_16BIT = "google/gemma-3-12b-it"
PUBLISHED_4BIT = "unsloth/gemma-3-12b-it-bnb-4bit"
MULTIMODAL_TEMPLATE_PATH = tiny.ASSETS_DIR / "gemma3_chat_template_multimodal.jinja"
MARKER_FORMAT = 1
VOCAB_PADDING = 64  # Gemma-3: 262208 embedding rows = 262144 tokens + 64 (Google's conversion script)

TEXT_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
             "max_position_embeddings": 4096},
    "12b": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
            "max_position_embeddings": 131072, "vocab_size": 262208},
}
"""``text_config`` sizes. ``12b`` = the published 12B; ``tiny`` = :data:`trinity_core.tiny.TINY_CONFIG`."""

VISION_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 112, "patch_size": 14, "mm_tokens_per_image": 4},
    "siglip-so400m": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "image_size": 896, "patch_size": 14, "mm_tokens_per_image": 256},
}
"""``vision_config`` sizes (+ ``mm_tokens_per_image``). Both pool 4×4 patches into one image token,
as the published model does (64×64 patches → 16×16 = 256 tokens; tiny: 8×8 → 2×2)."""

def published_config(repo_id: str) -> dict[str, Any]:
    """The published ``config.json`` of ``repo_id`` shipped in ``assets/model_configs``."""
    from trinity_core.model_config import SHIPPED_DIR

    return json.loads((SHIPPED_DIR / f"{repo_id.replace('/', '--')}.json").read_text(encoding="utf-8"))


def published_name(key: str) -> str:
    """A transformers-5 checkpoint key -> the published one (SigLIP under ``vision_tower.vision_model``)."""
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


# --------------------------------------------------------------------------- config files


def stand_in_config(*, quantized: bool, text: Mapping[str, Any], vision: Mapping[str, Any],
                    ids: Mapping[str, int], vocab_size: int, dtype: str) -> dict[str, Any]:
    """The published config of the 16-bit (Google) or 4-bit (Unsloth) checkpoint, resized."""
    config = published_config(PUBLISHED_4BIT if quantized else PUBLISHED_16BIT)
    config["text_config"].update({k: v for k, v in text.items() if k != "vocab_size"}, vocab_size=vocab_size)
    config["vision_config"].update({k: v for k, v in vision.items() if k != "mm_tokens_per_image"})
    config.update(boi_token_index=ids["boi"], eoi_token_index=ids["eoi"], image_token_index=ids["image"],
                  mm_tokens_per_image=vision["mm_tokens_per_image"], torch_dtype=dtype)
    # Google: eos [<eos>, <end_of_turn>]; Unsloth: eos <end_of_turn>, bos and pad at the top level.
    config["eos_token_id"] = [ids["eos"], ids["eot"]] if isinstance(config["eos_token_id"], list) else ids["eot"]
    for key in ("bos", "pad"):
        if f"{key}_token_id" in config:
            config[f"{key}_token_id"] = ids[key]
    for part in ("text_config", "vision_config"):
        if "torch_dtype" in config[part]:
            config[part]["torch_dtype"] = dtype
    if quantized:
        config["quantization_config"]["bnb_4bit_compute_dtype"] = dtype
    import transformers

    config["transformers_version"] = transformers.__version__
    return config


def processor_files(*, image_size: int, image_seq_length: int, tokenizer: Any, ids: Mapping[str, int],
                    chat_template: str) -> dict[str, Any]:
    """The published processor/tokenizer side files, as ``{file name: JSON content}``."""
    def token(t: str) -> dict[str, Any]:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "preprocessor_config.json": {
            "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
            "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
            "image_seq_length": image_seq_length, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
            "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size}},
        "processor_config.json": {"image_seq_length": image_seq_length, "processor_class": "Gemma3Processor"},
        "special_tokens_map.json": {
            "boi_token": tokenizer.boi_token, "bos_token": token(tokenizer.bos_token),
            "eoi_token": tokenizer.eoi_token, "eos_token": token(tokenizer.eos_token),
            "image_token": tokenizer.image_token, "pad_token": token(tokenizer.pad_token),
            "unk_token": token(tokenizer.unk_token)},
        "added_tokens.json": {tokenizer.image_token: ids["image"]},
        "chat_template.json": {"chat_template": chat_template},
        "generation_config.json": {
            "bos_token_id": ids["bos"], "cache_implementation": "hybrid", "do_sample": True,
            "eos_token_id": [ids["eos"], ids["eot"]], "pad_token_id": ids["pad"], "top_k": 64, "top_p": 0.95},
    }


# --------------------------------------------------------------------------- build


def build_multimodal_model(
    out_dir: str | os.PathLike[str],
    *,
    quantized: bool = False,
    text_shape: str = "tiny",
    vision_shape: str = "tiny",
    num_hidden_layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
) -> Path:
    """Build (or reuse) the stand-in in ``out_dir``; return it as an absolute Path.

    ``quantized``: like ``unsloth/gemma-3-12b-it-bnb-4bit`` (else like ``google/gemma-3-12b-it``).
    ``text_shape``/``vision_shape``: keys of :data:`TEXT_SHAPES`/:data:`VISION_SHAPES`;
    ``num_hidden_layers``/``vision_layers`` override their depth. Weights are initialised under
    ``torch.manual_seed(seed)`` (caller's RNG untouched); the same arguments give the same files.
    Cached and atomic like :func:`trinity_core.tiny.build_tiny_model` (marker ``trinity_tiny.json``).
    The 4-bit variant quantises on the GPU when there is one (bitsandbytes' CPU backend is slow at 12B).
    """
    out = Path(out_dir).absolute()
    text = {**TEXT_SHAPES[text_shape]}
    vision = {**VISION_SHAPES[vision_shape]}
    if num_hidden_layers is not None:
        text["num_hidden_layers"] = num_hidden_layers
    if vision_layers is not None:
        vision["num_hidden_layers"] = vision_layers
    marker: dict[str, Any] = {
        "format": MARKER_FORMAT, "kind": "gemma3-multimodal", "quantized": quantized, "seed": seed,
        "text": text, "vision": vision, "tokenizer_vocab_size": tiny.TOKENIZER_VOCAB_SIZE,
        "max_shard_size": max_shard_size, "assets_sha256": _assets_digest(),
    }
    if tiny._is_complete(out, marker):
        return out
    if out.exists() and not (out.is_dir() and ((out / tiny.MARKER_FILE).is_file() or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a Trinity tiny model; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _build_into(tmp, quantized=quantized, text=text, vision=vision, seed=seed, max_shard_size=max_shard_size,
                    dtype="float32" if text_shape == "tiny" else "bfloat16")
        for file in tmp.iterdir():
            file.chmod(0o644)
        (tmp / tiny.MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tiny._move_into_place(tmp, out, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _assets_digest() -> str:
    h = hashlib.sha256(tiny._assets_digest().encode())
    h.update(MULTIMODAL_TEMPLATE_PATH.read_bytes())
    for repo in (PUBLISHED_16BIT, PUBLISHED_4BIT):
        h.update(json.dumps(published_config(repo), sort_keys=True).encode())
    return h.hexdigest()


def _build_into(path: Path, *, quantized: bool, text: Mapping[str, Any], vision: Mapping[str, Any], seed: int,
                max_shard_size: str | int | None, dtype: str) -> None:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    template = MULTIMODAL_TEMPLATE_PATH.read_text(encoding="utf-8")
    tokenizer = tiny.build_tokenizer(path, image_tokens=True, chat_template=template)
    boi, eoi, image, eot = tokenizer.convert_tokens_to_ids([*tiny.IMAGE_TOKENS, tiny.END_OF_TURN])
    ids = {"boi": boi, "eoi": eoi, "image": image, "eot": eot, "eos": tokenizer.eos_token_id,
           "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id}
    vocab_size = text.get("vocab_size", tiny.TOKENIZER_VOCAB_SIZE + VOCAB_PADDING)
    config = stand_in_config(quantized=quantized, text=text, vision=vision, ids=ids, vocab_size=vocab_size,
                             dtype=dtype)
    model_config = Gemma3Config.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration._from_config(model_config, dtype=getattr(torch, dtype))
        # transformers initialises the projection to zeros (the published one is trained): random, so
        # that an image reaches the language model and a broken projector path shows
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            projection.normal_(0.0, model_config.initializer_range)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if quantized:
        staging = path / ".16bit"
        _save_published(model, staging, save_kwargs)
        (staging / "config.json").write_text(json.dumps(model_config.to_dict()), encoding="utf-8")
        del model
        model = _load_4bit(staging, config["quantization_config"], dtype)
        _save_published(model, path, save_kwargs)
        shutil.rmtree(staging)
    else:
        _save_published(model, path, save_kwargs)
    del model
    files = processor_files(image_size=vision["image_size"], image_seq_length=vision["mm_tokens_per_image"],
                            tokenizer=tokenizer, ids=ids, chat_template=template)
    files["config.json"] = config
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                 encoding="utf-8")


def _load_4bit(src: Path, quantization_config: Mapping[str, Any], dtype: str) -> Any:
    """``src`` (16-bit) as bitsandbytes loads it with the published quantisation settings."""
    import torch
    from transformers import BitsAndBytesConfig, Gemma3ForConditionalGeneration

    from trinity_core.backends.common import bnb_skip_modules

    q = quantization_config
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
                             bnb_4bit_use_double_quant=q["bnb_4bit_use_double_quant"],
                             bnb_4bit_compute_dtype=getattr(torch, dtype),
                             bnb_4bit_quant_storage=getattr(torch, q.get("bnb_4bit_quant_storage", "uint8")),
                             llm_int8_skip_modules=bnb_skip_modules(q["llm_int8_skip_modules"]))
    device_map = {"": 0} if torch.cuda.is_available() else None
    return Gemma3ForConditionalGeneration.from_pretrained(src, quantization_config=bnb, dtype=getattr(torch, dtype),
                                                          device_map=device_map)


def _save_published(model: Any, path: Path, save_kwargs: Mapping[str, Any]) -> None:
    """``save_pretrained`` the weights, then rename their keys to the published names (shard by shard)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {published_name(k): f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {"format": "pt"}
        save_file(tensors, str(shard), metadata=metadata)
    if index is not None:
        index["weight_map"] = {published_name(k): v for k, v in sorted(index["weight_map"].items())}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in ("config.json", "generation_config.json"):
        (path / name).unlink(missing_ok=True)  # written in the published form by the caller
