"""Merge a LoRA/rsLoRA/DoRA adapter into its base, one safetensors shard at a time.

What "the base" is matters. During QLoRA training every ``nn.Linear`` of the base was NF4: the
trained model computes with ``dequantize(NF4(W))``, not ``W``. So by default
(``merge_into="dequantized"``) the merge starts from exactly those weights:

* a pre-quantised ``*-bnb-4bit`` checkpoint (packed ``uint8`` + ``weight.absmax``,
  ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) is
  dequantised with its stored quant state;
* a 16-bit checkpoint is re-quantised the way bitsandbytes did at load time
  (``quantize_4bit`` in the load dtype, same quant type, blocksize 64, double quant) and
  dequantised; which modules bitsandbytes converted is decided by transformers' own rules on a
  meta-device copy of the model. Tests check both against a loaded ``Linear4bit``.

``merge_into="original"`` starts from the 16-bit weights of another checkpoint instead (the
un-quantised release of the same model); the result then differs from the trained model by the
NF4 rounding, and equals PEFT's ``merge_and_unload`` on that 16-bit model.

For every adapted module (fp32 math, cast to the output dtype at the end)::

    delta = scaling * B @ A            scaling = alpha / sqrt(r) (rsLoRA) or alpha / r
    LoRA:  W' = W + delta
    DoRA:  W' = m / ||W + delta||_row * (W + delta)    (norm over in_features, one per output row)

``B @ A`` is taken in float64 and rounded to fp32 once (:func:`exact_product`): a plain fp32 matmul
follows ``torch.set_float32_matmul_precision``, which training stacks lower, and that reaches the
CPU too (PyTorch then lets oneDNN multiply in TF32 or bf16 where the CPU has the instructions). The
4-bit arithmetic runs where training's did (``Quant.device``).

which is what PEFT's ``DoraLinearVariant.merge_safe`` computes. Each input shard becomes one
output shard, streamed tensor by tensor (:mod:`trinity_core.export.shards`): peak memory is the adapter
plus one weight and its fp32 temporaries, whatever the shard size (``bench/merge_rss.py``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trinity_core.artifacts import atomic_dir, atomic_write_json
from trinity_core.train.backends.common import quantization_skip
from trinity_core.errors import ExportError, HubDownloadError
from trinity_core.export.shards import SafetensorsReader, SafetensorsWriter

Emit = Callable[..., Any]

ADAPTER_PREFIX = "base_model.model."
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                  "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = COPIED_FILES[1:8]
MERGE_INFO = "trinity_merge.json"


@dataclass(frozen=True)
class Quant:
    """How bitsandbytes quantised the base during training (BitsAndBytesConfig + load dtype)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64  # bitsandbytes' Params4bit default; BitsAndBytesConfig does not change it
    dtype: str = "float32"  # dtype of the weights when quantised = from_pretrained(dtype=...)
    # dtype the trained model dequantised in (its layers' quant_state.dtype at the end of training):
    # Unsloth on a T4 loads in fp16 and then switches Gemma-3 to fp32, so the two differ. None: ``dtype``.
    dequant_dtype: str | None = None
    # where the trained model's 4-bit layers were quantised and dequantised ("cuda", "cuda:0", "cpu"):
    # the merge redoes its 4-bit arithmetic there when it can: bitsandbytes' CPU kernels need not round
    # as its CUDA ones. After an Unsloth job on the H200 every input of the merge equalled the model's
    # (bench/results/2026-11-28-h200-merge_diag-2.jsonl), yet the merged tensors done on the host's CPU
    # (AVX-512 FP16, AMX) were up to 3e-5 (pre-quantised, fp16 dequantisation) and 3.9e-4 (16-bit base,
    # bf16 re-quantisation) away: ...-gpu-multimodal-unsloth-7.txt; done on the GPU, with the CPU's
    # 16-bit dequantisation also rounded once from fp32 (nf4.dequantize_flat), both variants match
    # (...-unsloth-8.txt; which CPU kernel differed was not isolated). None: the tensors' own device.
    device: str | None = None

    def on(self):
        """The torch device of the merge's 4-bit arithmetic: ``device`` if this process has it, else CPU."""
        import torch

        if self.device and self.device.startswith("cuda") and torch.cuda.is_available():
            return torch.device(self.device)
        return torch.device("cpu")

    def dequant(self):
        import torch

        return getattr(torch, self.dequant_dtype or self.dtype)


PRODUCT_BLOCK_ELEMENTS = 1 << 24
"""float64 elements of one row block of :func:`exact_product` (128 MiB)."""


def exact_product(b, a):
    """``b @ a`` (out × r times r × in) as fp32, computed in float64 a block of rows at a time and
    rounded once: the same bits whatever matmul precision the process set (TF32, bf16) and on any
    device, so the merge and the merged-weights check (:mod:`trinity_core.evaluate.merge_check`)
    agree to the last bit on their deltas."""
    import torch

    a = a.double()
    product = torch.empty((b.shape[0], a.shape[1]), dtype=torch.float32, device=b.device)
    step = max(1, PRODUCT_BLOCK_ELEMENTS // max(1, a.shape[1]))
    for i in range(0, b.shape[0], step):
        product[i:i + step] = b[i:i + step].double() @ a
    return product


@dataclass
class Delta:
    """One adapted module: ``W' = f(W, scaling * B @ A, magnitude)``."""

    A: Any
    B: Any
    scaling: float
    magnitude: Any = None

    def apply(self, weight):
        import torch

        w = weight.float()
        delta = exact_product(self.B, self.A.to(self.B.device)) * self.scaling
        if delta.shape != w.shape:
            raise ExportError(f"adapter delta {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
        w = w + delta
        if self.magnitude is not None:
            norm = torch.linalg.norm(w, dim=1)
            w = (self.magnitude.float() / norm).view(-1, 1) * w
        return w


# --------------------------------------------------------------------------- inputs


def model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local model directory: ``name_or_path`` itself, or a hub snapshot (safetensors only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as e:  # network, auth, missing repo: the hub raises many types
        raise HubDownloadError(f"cannot download {name_or_path}: {e}") from e


def shard_files(src: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, in file-name order."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / name for name in sorted(set(weight_map.values()))]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise ExportError(f"{src} has no safetensors weights (model.safetensors or an index)")


def load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Delta]]:
    """Read a PEFT adapter: ``(adapter_config, {model module name: Delta})``."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("modules_to_save", "layer_replication", "target_parameters") if config.get(k)]
    if config.get("fan_in_fan_out") or config.get("lora_bias"):
        unsupported.append("fan_in_fan_out/lora_bias")
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ExportError(f"cannot merge this adapter: unsupported {unsupported or config.get('peft_type')}")
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    parts: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", key)
        if not m:
            raise ExportError(f"unexpected adapter tensor {key} (embedding or bias adapters are not supported)")
        parts.setdefault(m.group(1).removeprefix(ADAPTER_PREFIX), {})[m.group(2).split(".")[0]] = value
    deltas = {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise ExportError(f"adapter module {module} lacks lora_A or lora_B")
        r = p["lora_A"].shape[0]
        key = get_pattern_key(alpha_pattern.keys(), module) if alpha_pattern else None
        alpha = alpha_pattern.get(key, config["lora_alpha"]) if key else config["lora_alpha"]
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas[module] = Delta(p["lora_A"], p["lora_B"], scaling, p.get("lora_magnitude_vector"))
    return config, deltas


def _meta_model(src: Path):
    """The model class of ``src/config.json`` instantiated on the meta device (no memory)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
    config.quantization_config = None
    arch = (config.architectures or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None)
    with torch.device("meta"):
        if cls is None or arch.startswith("Auto"):
            return transformers.AutoModelForCausalLM.from_config(config)
        return cls(config)


def checkpoint_renamer(model) -> Callable[[str], str]:
    """Checkpoint key -> model parameter name, with transformers' renames for this architecture
    (e.g. gemma3's ``language_model.model.X`` -> ``model.language_model.X``). Adapter keys use the
    model's names; merged checkpoints keep the checkpoint's names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        # WeightRenaming and its PrefixChange (SigLIP: vision_tower.vision_model.X -> model.vision_tower.X)
        renames = [t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightRenaming)]
    except Exception:  # an internal API: without it, names are taken as they are
        renames = []

    def rename(key: str) -> str:
        for t in renames:
            key, _ = t.rename_source_key(key)
        return key

    return rename


def bnb_linear_names(model, quant_config: dict[str, Any] | None = None) -> set[str]:
    """Names of the ``nn.Linear`` modules bitsandbytes replaces when loading ``model`` in 4 bits,
    using transformers' own skip rules (tied/output embeddings, ``llm_int8_skip_modules``)."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(get_keys_to_not_convert(model))
    skip += list((quant_config or {}).get("llm_int8_skip_modules") or [])
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {name for name, mod in model.named_modules()
            if type(mod) is torch.nn.Linear and should_convert_module(name, skip)}


# --------------------------------------------------------------------------- 4-bit


def nf4_roundtrip(weight, quant: Quant):
    """``dequantize(quantize(weight))`` exactly as bitsandbytes' ``Params4bit`` quantised it."""
    import bitsandbytes.functional as bnbf
    import torch

    from trinity_core import nf4  # dequantises flat: bitsandbytes' CPU kernel misreads some widths

    w = weight.to(quant.on()).to(getattr(torch, quant.dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(w, blocksize=quant.blocksize, compress_statistics=quant.double_quant,
                                       quant_type=quant.quant_type)
    return nf4.dequantize(packed, state, quant.dequant()).to(weight.device)


def quantized_in(model, base: str | Path, revision: str | None = None) -> str | None:
    """The dtype bitsandbytes quantised a 16-bit base's weights in when ``model`` (the trained model,
    PEFT-wrapped or not) was loaded, found by quantising one of its 4-bit layers' checkpoint weight
    again in each candidate dtype and comparing codes and dequantised values: the load dtype is not
    always the one asked for (Unsloth loads Gemma-3 in bf16 on a card that has it when fp16 is asked,
    the T4 path emulated on an H200, and then relabels the layers' quant state fp16). None for a
    pre-quantised base (nothing is quantised at load), a model without 4-bit layers, or when no
    candidate reproduces the layer (the merge then keeps the spec's dtype, and the merged-weights
    check reports the difference)."""
    import bitsandbytes.functional as bnbf
    import torch

    from trinity_core import nf4

    src = model_dir(base, revision)
    if json.loads((src / "config.json").read_text()).get("quantization_config"):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = next(((name.removesuffix(".base_layer"), m.weight) for name, m in inner.named_modules()
                  if getattr(getattr(m, "weight", None), "quant_state", None) is not None), None)
    if found is None:
        return None
    name, weight = found
    state = weight.quant_state
    rename = checkpoint_renamer(inner)
    for shard in shard_files(src):
        with SafetensorsReader(shard) as reader:
            key = next((k for k in reader.keys() if rename(k) == name + ".weight"), None)
            if key is None:
                continue
            original = reader.get(key).to(weight.device)
            want = nf4.dequantize(weight.data, state)
            for dtype in dict.fromkeys((state.dtype, torch.bfloat16, torch.float16, torch.float32)):
                packed, again = bnbf.quantize_4bit(original.to(dtype).contiguous(), blocksize=state.blocksize,
                                                   compress_statistics=state.nested, quant_type=state.quant_type)
                if torch.equal(packed.view(torch.uint8).reshape(-1), weight.data.view(torch.uint8).reshape(-1)) \
                        and torch.equal(nf4.dequantize(packed, again, state.dtype), want):
                    return str(dtype).removeprefix("torch.")
            return None
    return None


def dequantize_prequantized(packed, stats: dict[str, Any], quant: Quant | None = None):
    """Dequantise a packed ``Params4bit`` tensor from its serialized quant-state tensors, in the dtype
    the trained model dequantised in (``quant.dequant_dtype``; default: the one serialized)."""
    import bitsandbytes.functional as bnbf

    from trinity_core import nf4

    where = quant.on() if quant is not None else packed.device
    state = bnbf.QuantState.from_dict({f"weight.{k}": v.to(where) for k, v in stats.items()}, device=where)
    dtype = quant.dequant() if quant is not None and quant.dequant_dtype else None
    return nf4.dequantize(packed.to(where), state, dtype).to(packed.device)


# --------------------------------------------------------------------------- output


def _shard_plan(reader: SafetensorsReader, out_dtype: Any) -> tuple[list[tuple[str, Any, tuple[int, ...]]],
                                                                    dict[str, dict[str, str]]]:
    """What an input shard becomes: ``[(key, dtype, shape)]`` of the output tensors (packed 4-bit
    weights take the shape in their quant state) and, per packed weight, its quant-state keys."""
    import bitsandbytes.functional as bnbf

    from trinity_core.export.shards import torch_dtype

    stats_of: dict[str, dict[str, str]] = {}
    for key in reader.keys():
        for suffix in QUANT_SUFFIXES:
            if key.endswith("." + suffix):
                stats_of.setdefault(key[: -len(suffix) - 1], {})[suffix] = key
    aux = {k for s in stats_of.values() for k in s.values()}
    plan = []
    for key in reader.keys():
        if key in aux:
            continue
        info = reader.header[key]
        dtype, shape = torch_dtype(info["dtype"]), tuple(info["shape"])
        if key in stats_of:
            packed_state = next(k for s, k in stats_of[key].items() if s.startswith("quant_state."))
            shape = tuple(bnbf.unpack_tensor_to_dict(reader.get(packed_state))["shape"])
            dtype = out_dtype
        elif dtype.is_floating_point:
            dtype = out_dtype
        plan.append((key, dtype, shape))
    return plan, stats_of


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def _output_dtype(src_config: dict[str, Any], dtype: str | None):
    import torch

    name = dtype or src_config.get("dtype") or src_config.get("torch_dtype") \
        or (src_config.get("text_config") or {}).get("dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."))


def _clean_config(config: dict[str, Any], dtype) -> dict[str, Any]:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config


def copy_tokenizer(srcs: list[Path], out: Path) -> None:
    """Copy generation config + tokenizer files (the first of ``srcs`` that has a tokenizer wins)
    and make sure ``tokenizer_config.json`` carries ``added_tokens_decoder`` for llama.cpp."""
    from transformers import AutoTokenizer

    from trinity_core.export.gguf import write_added_tokens_decoder

    tok_src = next((s for s in srcs if (s / "tokenizer_config.json").is_file()), None)
    if tok_src is None:
        raise ExportError(f"no tokenizer found in {[str(s) for s in srcs]}")
    for name in COPIED_FILES:
        src = tok_src if name in TOKENIZER_FILES else next((s for s in srcs if (s / name).is_file()), None)
        if src is not None and (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    write_added_tokens_decoder(AutoTokenizer.from_pretrained(out), out)


# --------------------------------------------------------------------------- merge


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | Path,
    revision: str | None = None,
    merge_into: str = "dequantized",
    original_model: str | Path | None = None,
    quant: Quant | None = Quant(),
    dtype: str | None = None,
    emit: Emit | None = None,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into the base and write safetensors + config + tokenizer to ``out_dir``.

    ``base_model``: the checkpoint training loaded (16-bit or pre-quantised bnb-4bit).
    ``merge_into``: ``dequantized`` (the NF4 weights training saw; ``quant`` says how a 16-bit base
    was quantised, ``None`` if it was not) or ``original`` (16-bit weights of ``original_model``).
    ``dtype``: output dtype name; default the checkpoint's ``config.dtype``.
    The directory appears complete or not at all. Returns what was done (also written to
    ``out_dir/trinity_merge.json``).
    """
    emit = emit or (lambda *a, **k: None)
    t0 = time.monotonic()
    adapter_dir = Path(adapter_dir)
    base_dir = model_dir(base_model, revision)
    if merge_into == "original":
        if original_model is None:
            raise ExportError("merge_into='original' needs original_model")
        src = model_dir(original_model)
    elif merge_into == "dequantized":
        src = base_dir
    else:
        raise ExportError(f"unknown merge_into {merge_into!r}")

    adapter_config, deltas = load_adapter(adapter_dir)
    src_config = json.loads((src / "config.json").read_text())
    out_dtype = _output_dtype(src_config, dtype)
    meta = _meta_model(src)
    rename = checkpoint_renamer(meta)
    roundtrip = merge_into == "dequantized" and quant is not None
    # A pre-quantised base: training saw exactly its stored values (4-bit ones dequantised below, the
    # rest as stored), so nothing is re-quantised. A 16-bit one: what bitsandbytes converted on load,
    # with the backends' skip list (a multimodal model's vision tower and projector stay 16-bit).
    skip = quantization_skip(src_config)
    bnb_names = set() if not roundtrip or src_config.get("quantization_config") else \
        bnb_linear_names(meta, {"llm_int8_skip_modules": skip} if skip else None)
    del meta

    counts = {"tensors": 0, "merged": 0, "dequantized": 0, "requantized": 0}
    seen: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out_dir) as tmp:
        shards = shard_files(src)
        for number, shard in enumerate(shards, 1):
            name = shard_name(number, len(shards))
            with SafetensorsReader(shard) as reader:
                plan, stats_of = _shard_plan(reader, out_dtype)
                with SafetensorsWriter(tmp / name, plan) as writer:
                    for key, _, _ in plan:
                        tensor = reader.get(key)
                        module = rename(key).removesuffix(".weight")
                        if key in stats_of:
                            if merge_into == "original":
                                raise ExportError(f"original_model {original_model} is 4-bit ({key})")
                            stats = {s: reader.get(k) for s, k in stats_of[key].items()}
                            tensor = dequantize_prequantized(tensor, stats, quant)
                            counts["dequantized"] += 1
                        elif roundtrip and key.endswith(".weight") and module in bnb_names:
                            tensor = nf4_roundtrip(tensor, quant)
                            counts["requantized"] += 1
                        if key.endswith(".weight") and module in deltas:
                            tensor = deltas[module].apply(tensor)
                            seen.add(module)
                            counts["merged"] += 1
                        writer.write(key, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
                        weight_map[key] = name
                        counts["tensors"] += 1
                        del tensor
                total += writer.data_size
            emit(f"merge: shard {number}/{len(shards)} written", shard=number, shards=len(shards))
        missing = sorted(set(deltas) - seen)
        if missing:
            raise ExportError(f"{len(missing)} adapter modules not found in {src}: {missing[:5]}",
                              details={"missing": missing})
        if len(shards) > 1:
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        atomic_write_json(tmp / "config.json", _clean_config(src_config, out_dtype))
        copy_tokenizer([adapter_dir, base_dir, src], tmp)
        info = {
            "merge_into": merge_into,
            "source": str(original_model if merge_into == "original" else base_model),
            "quant": asdict(quant) if roundtrip else None,
            "dtype": str(out_dtype).removeprefix("torch."),
            "shards": len(shards),
            "bytes": total,
            **counts,
            "rslora": bool(adapter_config.get("use_rslora")),
            "dora": any(d.magnitude is not None for d in deltas.values()),
            "seconds": round(time.monotonic() - t0, 2),
        }
        atomic_write_json(tmp / MERGE_INFO, info)
    emit(f"merged {counts['merged']} LoRA modules of {adapter_dir} into the "
         f"{'dequantised' if merge_into == 'dequantized' else 'original'} base {info['source']} → {out_dir} "
         f"in {info['seconds']} s",
         merge_into=merge_into, dtype=info["dtype"], shards=len(shards), seconds=info["seconds"])
    return info
