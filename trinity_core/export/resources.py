"""Host resources of a job's export: the disk it writes and the host RAM each export stage needs.

``check(spec, workdir)`` runs after data preparation and before training: a job whose checkpoints
and export cannot fit the workdir's disk, or whose largest export stage cannot fit the host's free
RAM, is refused at once with :class:`ExportResourcesError` (``insufficient_disk`` /
``insufficient_memory``) instead of failing hours later. Everything is computed from the model's
config (text model, and for Gemma3ForConditionalGeneration the SigLIP tower + projector) and the
spec; no torch import. Basis of each figure (docs/BENCHMARKS.md, "Host resources"):

Disk, bytes written under the workdir
- checkpoints: ``save_total_limit + 1`` (one more is written to ``.staging`` before the oldest is
  dropped; one more again when the best evaluated step is kept for export, ``export.checkpoint = best``) × (adapter + optimizer state: 8-bit AdamW keeps 2 bytes a parameter for tensors of ≥ 4096
  elements, 8 below; ``adamw_torch`` 8) + the tokenizer files the Trainer saves.
- adapter: trainable parameters × 2 bytes (bf16, as the tiny run wrote it).
- merged: every parameter of the checkpoint (text, vision tower, projector, embeddings) in the
  config's dtype (bf16: 2 bytes) + tokenizer files.
- GGUF f16: the text model, matrices 2 bytes, 1-D tensors (norms) f32; + the vocabulary.
- each quantisation: llama.cpp's per-tensor choice (``llama-quant.cpp``): q4_k_m is Q4_K (4.5 bits)
  except attn_v/ffn_down of the ``use_more_bits`` layers and the tied token embedding, Q6_K
  (6.5625 bits); rows not a multiple of 256 fall back (Q4_K→Q5_0, Q6_K→Q8_0, token_embd→Q8_0).
- mmproj: vision tower + projector, matrices f16, embeddings and 1-D tensors f32.

Peak host RAM of each export stage (RSS): the stage's working set on top of the process running it
- merge (in the job's process): the adapter (read whole) + the larger of the largest tensor copied
  as stored (Gemma-3's 262k × 3840 embedding, 2 GB bf16) and the largest merged projection ×
  ``MERGE_BYTES_PER_ELEMENT`` (measured: NF4 dequant + DoRA fp32 temporaries).
- GGUF f16 / mmproj (a converter subprocess, lazy tensors): its own interpreter + the largest tensor
  × ``CONVERT_BYTES_PER_ELEMENT`` (measured).
- quantise (llama.cpp in the job's process, tensor by tensor, read from source): the largest tensor
  in f32 + its quantised output + its f16 bytes (memory-mapped).
- evaluate (read from ``evaluate.py`` / llama-cpp-python): llama.cpp's ``logits_all`` buffers over the
  longest held-out row (``scores`` n_ctx × vocab fp32, a copy, two softmax temporaries, n_batch of
  llama.cpp's own); without CUDA also the models themselves (4-bit trained, fp32 merged).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trinity_core.errors import ExportResourcesError
from trinity_core.spec import JobSpec

GB = 10**9
GIB = 2**30

# Bits a weight per llama.cpp tensor type (block bytes × 8 / block size), and block sizes.
BITS = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_K": 4.5}
BLOCK = {"Q8_0": 32, "Q6_K": 256, "Q5_K": 256, "Q5_1": 32, "Q5_0": 32, "Q4_K": 256}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's tensor_type_fallback
DEFAULT_TYPE = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q8_0": "Q8_0"}
GGUF_VOCAB_BYTES = 32  # per token: length-prefixed string + score + type (tiny run: 28.6 KB for 1024 tokens, all
GGUF_FIXED_BYTES = 1 << 16  # metadata included; so these two are an upper bound fitted on that file)
ADAPTER_BYTES = 2  # a parameter of adapter_model.safetensors (the tiny CPU run wrote bf16: 851,864 bytes)
CHECKPOINT_FIXED_BYTES = 40_000  # rng state, scheduler, trainer state, training args, README (~33 KB tiny)
OPTIM_TENSOR_BYTES = 2816  # optimizer.pt per adapter tensor beyond its states: 8-bit quant maps, absmax,
# pickling (fitted: the tiny run's optimizer.pt is 1,157,643 bytes for 126 tensors of 405,504 parameters)
SAFETENSORS_HEADER_BYTES = 160  # per tensor (name, dtype, shape, offsets in JSON)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")

# Measured on CPU (docs/BENCHMARKS.md, "Host resources"; raw files bench/results/2026-11-28-cpu-export_resources.txt).
PROCESS_BYTES = int(0.40 * GIB)  # a process with the export modules imported (merge child: 0.98 GiB − 0.56 embedding − adapter)
MERGE_BYTES_PER_ELEMENT = 16.5  # merging one projection (NF4 dequant + DoRA fp32 temporaries), beyond its input
CONVERT_BYTES_PER_ELEMENT = 2.0  # the converter's anonymous peak over its imports, per element of the largest
# tensor, run by Trinity's runner (export/gguf_convert.py casts bf16 straight to f16): (2.146 GiB − its 0.35 GiB
# baseline) / 1.007e9 elements of the 12B embedding = 1.91 (bench/results/2026-11-28-cpu-gguf_convert_rss.json;
# llama.cpp's own converter, through f32: 6.1). Its mmap'd input is page cache, which the kernel reclaims.
CONVERT_PROCESS_BYTES = int(0.35 * GIB)  # the converter's interpreter + imports (0.344 GiB converting the tiny model)


@dataclass
class Tensor:
    name: str
    rows: int  # out (ggml ne[1]); 1 for 1-D
    cols: int  # in  (ggml ne[0]), what K-quants need to be a multiple of 256
    part: str  # text | vision | projector
    kind: str = ""  # token_embd, attn_v, ffn_down, ... (llama.cpp's categories), norm, embedding
    layer: int = -1

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass
class HostFree:
    """What the host has free: bytes of disk under ``where`` and bytes of RAM (``ram_from`` says how)."""

    disk: int
    ram: int
    where: str = ""
    ram_from: str = ""


@dataclass
class Estimate:
    disk: dict[str, int] = field(default_factory=dict)  # part -> bytes still to be written
    ram: dict[str, int] = field(default_factory=dict)  # stage -> peak RSS bytes of its process
    ram_extra: dict[str, int] = field(default_factory=dict)  # stage -> bytes beyond what is already in use
    basis: dict[str, str] = field(default_factory=dict)

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    @property
    def peak_stage(self) -> str:
        return max(self.ram_extra, key=self.ram_extra.get) if self.ram_extra else ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "disk_total": self.disk_total, "peak_stage": self.peak_stage,
                "peak_ram": self.ram.get(self.peak_stage, 0)}


# --------------------------------------------------------------------------- shapes


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return default if value is None else value


def text_tensors(config: Any) -> list[Tensor]:
    """The language model's tensors (Gemma-3 layout: 7 projections, 4 norms + q/k norms a layer)."""
    t = _get(config, "text_config") or config
    h, inter, n = _get(t, "hidden_size"), _get(t, "intermediate_size"), _get(t, "num_hidden_layers")
    heads = _get(t, "num_attention_heads")
    kv, hd = _get(t, "num_key_value_heads", heads), _get(t, "head_dim", h // heads)
    out = [Tensor("token_embd", _get(t, "vocab_size"), h, "text", "token_embd")]
    if not _get(t, "tie_word_embeddings", True):
        out.append(Tensor("output", _get(t, "vocab_size"), h, "text", "output"))
    for i in range(n):
        out += [Tensor(f"{i}.{k}", rows, cols, "text", k, i) for k, rows, cols in (
            ("attn_q", heads * hd, h), ("attn_k", kv * hd, h), ("attn_v", kv * hd, h), ("attn_output", h, heads * hd),
            ("ffn_gate", inter, h), ("ffn_up", inter, h), ("ffn_down", h, inter))]
        out += [Tensor(f"{i}.norm{j}", 1, h, "text", "norm", i) for j in range(4)]
        out += [Tensor(f"{i}.qk_norm{j}", 1, hd, "text", "norm", i) for j in range(2)]
    out.append(Tensor("output_norm", 1, h, "text", "norm"))
    return out


def vision_tensors(config: Any) -> list[Tensor]:
    """SigLIP tower + Gemma-3 projector (empty for a text-only config)."""
    v = _get(config, "vision_config")
    if v is None:
        return []
    t = _get(config, "text_config") or config
    h, inter, n = _get(v, "hidden_size"), _get(v, "intermediate_size"), _get(v, "num_hidden_layers")
    patch, channels = _get(v, "patch_size"), _get(v, "num_channels", 3)
    patches = (_get(v, "image_size") // patch) ** 2
    out = [Tensor("patch_embd", h, channels * patch * patch, "vision", "embedding"),
           Tensor("patch_bias", 1, h, "vision", "embedding"),
           Tensor("position_embd", patches, h, "vision", "embedding")]
    for i in range(n):
        out += [Tensor(f"v{i}.{k}", h, h, "vision", "matrix", i) for k in ("q", "k", "v", "o")]
        out += [Tensor(f"v{i}.fc1", inter, h, "vision", "matrix", i), Tensor(f"v{i}.fc2", h, inter, "vision", "matrix", i)]
        out += [Tensor(f"v{i}.b{j}", 1, h, "vision", "norm", i) for j in range(9)]  # 2 layer norms (w, b), 5 biases
        out.append(Tensor(f"v{i}.fc1_bias", 1, inter, "vision", "norm", i))
    out += [Tensor("post_ln", 1, 2 * h, "vision", "norm"),
            Tensor("mm_input_projection", _get(t, "hidden_size"), h, "projector", "matrix"),
            Tensor("mm_soft_emb_norm", 1, h, "projector", "norm")]
    return out


def trainable_tensors(config: Any, spec: JobSpec) -> list[tuple[int, int]]:
    """(elements, count) of the adapter's tensors: LoRA A and B per adapted projection (+ DoRA magnitudes)."""
    kinds, r = _adapted(spec), spec.lora.r
    out = []
    for t in text_tensors(config):
        if t.kind in kinds:
            out += [(r * t.cols, 1), (t.rows * r, 1)] + ([(t.rows, 1)] if spec.lora.use_dora else [])
    return out


def dtype_bytes(data: dict[str, Any]) -> int:
    """Bytes a parameter of the merged checkpoint: its config's dtype, as ``merge`` picks it."""
    name = data.get("dtype") or data.get("torch_dtype") or (data.get("text_config") or {}).get("dtype") or "float32"
    return 4 if "32" in str(name) else 2


def _adapted(spec: JobSpec) -> set[str]:
    """llama.cpp's names of the projections the spec adapts."""
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    return {names[t] for t in spec.lora.target_modules if t in names}


# --------------------------------------------------------------------------- GGUF


def gguf_type(t: Tensor, qtype: str, n_layers: int) -> str:
    """llama.cpp's type for one tensor of a ``qtype`` file (llama-quant.cpp, tied embeddings)."""
    if t.rows == 1:
        return "F32"  # 1-D tensors are never quantised
    if qtype == "f16":
        return "F16"
    new = DEFAULT_TYPE[qtype]
    if t.kind == "token_embd":  # tied: quantised like the output tensor
        return "Q8_0" if new == "Q8_0" or t.cols % 256 else "Q6_K"
    if qtype in ("q4_k_m", "q5_k_m") and t.kind in ("attn_v", "ffn_down") and _use_more_bits(t.layer, n_layers):
        new = "Q6_K"
    if t.cols % BLOCK[new]:
        new = FALLBACK.get(new, new)
        if t.cols % BLOCK.get(new, 32):
            new = "F16"
    return new


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_bytes(tensors: list[Tensor], qtype: str, vocab: int) -> int:
    n_layers = 1 + max((t.layer for t in tensors), default=0)
    body = sum(_padded(t.numel * BITS[gguf_type(t, qtype, n_layers)] / 8) for t in tensors)
    return int(body + vocab * GGUF_VOCAB_BYTES + GGUF_FIXED_BYTES)


def mmproj_bytes(tensors: list[Tensor]) -> int:
    body = sum(_padded(t.numel * (4 if t.rows == 1 or t.kind == "embedding" else 2)) for t in tensors)
    return int(body + GGUF_FIXED_BYTES)


def _padded(n: float) -> float:
    return -(-n // 32) * 32  # GGUF aligns each tensor to 32 bytes


# --------------------------------------------------------------------------- the estimate


def estimate(config: Any, spec: JobSpec, *, dtype_bytes: int = 2, tokenizer_bytes: int = 0,
             eval_tokens: int | None = None, cuda: bool = True, existing: dict[str, int] | None = None) -> Estimate:
    """Disk and host RAM of ``spec``'s checkpoints and export on the model ``config``.

    ``dtype_bytes``: the merged checkpoint's dtype (the config's; bf16 = 2). ``tokenizer_bytes``: the
    tokenizer files copied next to checkpoints, adapter and merged model. ``eval_tokens``: the longest
    held-out row (default ``max_seq_length``). ``cuda``: evaluation runs its models on a GPU.
    ``existing``: bytes already on disk per part (a resumed job), subtracted from what is needed."""
    text, vision = text_tensors(config), vision_tensors(config)
    vocab = text[0].rows
    ex, est = spec.export, Estimate()
    adapter = trainable_tensors(config, spec)
    adapter_params = sum(n for n, _ in adapter)
    optim = sum(n * (8 if spec.train.optim == "adamw_torch" or n < 4096 else 2) + OPTIM_TENSOR_BYTES for n, _ in adapter)
    # adapter_model.safetensors (+ a JSON header entry a tensor; DoRA magnitudes counted in fp32) + config, README
    adapter_file = sum(n * ADAPTER_BYTES + SAFETENSORS_HEADER_BYTES for n, _ in adapter) \
        + (2 * sum(t.rows for t in text_tensors(config) if t.kind in _adapted(spec)) if spec.lora.use_dora else 0) \
        + CHECKPOINT_FIXED_BYTES // 4
    kept = spec.train.save_total_limit + 1 + kept_best_checkpoint(spec)
    est.disk["checkpoints"] = kept * (adapter_file + optim + tokenizer_bytes + CHECKPOINT_FIXED_BYTES)
    est.disk["adapter"] = adapter_file
    merged_tensors = text + vision
    if ex.merge:
        est.disk["merged"] = (sum(t.numel for t in merged_tensors) * dtype_bytes
                              + SAFETENSORS_HEADER_BYTES * len(merged_tensors) + tokenizer_bytes)
        if ex.gguf:
            for q in dict.fromkeys(["f16", *ex.quantizations]):
                est.disk[f"gguf_{q}"] = gguf_bytes(text, q, vocab)
            if vision:
                est.disk["mmproj"] = mmproj_bytes(vision)
    for part, have in (existing or {}).items():
        if part in est.disk:
            est.disk[part] = max(0, est.disk[part] - have)

    largest = max(text + vision, key=lambda t: t.numel)
    merged_proj = max((t for t in text if t.kind.startswith(("attn_", "ffn_"))), key=lambda t: t.numel)
    if ex.merge:
        per_element = MERGE_BYTES_PER_ELEMENT + dtype_bytes
        work = adapter_params * ADAPTER_BYTES + max(largest.numel * dtype_bytes, merged_proj.numel * per_element)
        _stage(est, "merge", int(work), child=False,
               basis=f"adapter {adapter_params * ADAPTER_BYTES / GB:.2f} GB + max(largest tensor {largest.name} as stored, "
                     f"largest merged projection {merged_proj.rows}x{merged_proj.cols} x {per_element} B)")
    if ex.merge and ex.gguf:
        _stage(est, "gguf_f16", int(largest.numel * CONVERT_BYTES_PER_ELEMENT), child=True,
               basis=f"converter subprocess + {largest.name} ({largest.numel / 1e6:.0f}M) x {CONVERT_BYTES_PER_ELEMENT} B")
        for q in dict.fromkeys(q for q in ex.quantizations if q != "f16"):
            n_layers = 1 + max(t.layer for t in text)
            quantised = max(_padded(t.numel * BITS[gguf_type(t, q, n_layers)] / 8) for t in text)
            big = max(text, key=lambda t: t.numel)
            # anonymous memory only: the f16 input is mmap'd (page cache; the kernel drops it under
            # pressure, and a cgroup's RAM left counts it free: cgroup_ram_left). At the 12B embedding
            # this predicts 5.29 GB; measured 4.92 GB anonymous (4.582 GiB, the same JSON)
            _stage(est, f"quantize_{q}", int(big.numel * 4 + quantised), child=False,
                   basis=f"llama.cpp: {big.name} in f32 + its {q} output (the f16 input is mmap'd)")
        if vision:
            v_big = max(vision, key=lambda t: t.numel)
            _stage(est, "mmproj", int(v_big.numel * CONVERT_BYTES_PER_ELEMENT), child=True,
                   basis=f"converter subprocess + {v_big.name} x {CONVERT_BYTES_PER_ELEMENT} B")
    if ex.evaluate:
        n_ctx = min(eval_tokens or spec.model.max_seq_length, spec.model.max_seq_length) + 8
        n_batch = min(n_ctx, 512)
        work = (4 * n_ctx + n_batch) * vocab * 4
        basis = f"logits over vocab {vocab} for {n_ctx} tokens (llama.cpp logits_all + copies)"
        if not cuda:  # the 4-bit trained model and the fp32 merged model live in host memory
            params = sum(t.numel for t in merged_tensors)
            work += int(params * 0.6) + (params * 4 if ex.merge else 0)
            basis += " + the 4-bit and fp32 merged models in host memory (no CUDA)"
        _stage(est, "evaluate", int(work), child=False, basis=basis)
    return est


def _stage(est: Estimate, name: str, work: int, *, child: bool, basis: str) -> None:
    """A stage's peak: its working set on top of the process running it (a child has its own)."""
    base = CONVERT_PROCESS_BYTES if child else PROCESS_BYTES
    est.ram[name] = base + work
    est.ram_extra[name] = base + work if child else work
    est.basis[name] = basis


# --------------------------------------------------------------------------- the host


def host_free(workdir: str | Path) -> HostFree:
    """Free disk under ``workdir`` and RAM: MemAvailable, or what this process's cgroup (or one above
    it) still allows, if lower (:func:`cgroup_ram_left`)."""
    workdir = Path(workdir)
    disk = shutil.disk_usage(workdir).free
    ram, source = _meminfo_available(), "/proc/meminfo MemAvailable"
    left = cgroup_ram_left()
    if left is not None and left[0] < ram:
        ram, source = left
    return HostFree(disk=disk, ram=ram, where=str(workdir.resolve()), ram_from=source)


def cgroup_ram_left(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
                    ) -> tuple[int, str] | None:
    """(bytes, which cgroup) the tightest cgroup v2 memory limit on this process still allows:
    ``memory.max`` less what is in use, for its own cgroup and every one above it, the least; None
    without a limit. A container limited with ``mem_limit`` sees its own cgroup at ``root``; a
    process moved into a sub-cgroup (``0::/trinity8g`` in ``/proc/self/cgroup``) is limited there,
    where ``root``'s own files say nothing (the root cgroup has no ``memory.max``).

    In use = ``memory.current`` less the page cache (``file`` in ``memory.stat``): the cache is
    charged to the cgroup, and after the export has written its GGUF files it fills the limit
    (H200, 2026-11-28: ``memory.peak`` = ``memory.max`` = 8e9 in a run that never came near it in
    anonymous memory), but the kernel reclaims it before it kills anything."""
    root = Path(root)
    try:
        line = next(ln for ln in Path(proc_cgroup).read_text().splitlines() if ln.startswith("0::"))
    except (OSError, StopIteration):
        line = "0::/"
    here = (root / line[3:].strip().lstrip("/")).resolve()
    best = None
    for level in (here, *here.parents):
        if root.resolve() not in (level, *level.parents):
            break
        limit, used = _read_int(level / "memory.max"), _read_int(level / "memory.current")
        if used is not None:
            used -= _memory_stat(level / "memory.stat").get("file", 0)
        if limit is not None and used is not None and (best is None or limit - used < best[0]):
            where = "/" + str(level.relative_to(root.resolve())).removeprefix(".")
            best = (max(0, limit - used), f"cgroup {where} memory.max - memory.current")
    return best


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _memory_stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (ln.split() for ln in path.read_text().splitlines() if len(ln.split()) == 2)}
    except (OSError, ValueError):
        return {}


def _read_int(path: str | Path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def existing_bytes(workdir: Path) -> dict[str, int]:
    """What a resumed job already has on disk that it will not write again: its checkpoints (rotated,
    not added to). A merged directory or GGUF file is replaced only once its successor is complete
    (``artifacts.atomic_dir``), so an old one does not lower the need."""
    ckpt = workdir / "checkpoints"
    return {"checkpoints": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt.exists() else 0}


def check(spec: JobSpec, workdir: str | Path, *, config: Any, free: HostFree | None = None,
          **kw: Any) -> tuple[Estimate, HostFree]:
    """Estimate, compare with what is free (``free``: the test seam; default :func:`host_free`) and
    raise :class:`ExportResourcesError` when the disk or the largest stage's RAM does not fit."""
    workdir = Path(workdir)
    est = estimate(config, spec, existing=existing_bytes(workdir), **kw)
    free = free or host_free(workdir)
    details = {"estimate": est.to_dict(), "free": asdict(free)}
    if est.disk_total > free.disk:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in est.disk.items() if v)
        raise ExportResourcesError(
            f"not enough disk for this job's checkpoints and export: needs {est.disk_total / GB:.2f} GB ({parts} GB), "
            f"{free.disk / GB:.2f} GB free in {free.where}. Free space there, use another workdir, or lower it in the "
            "spec: export.gguf false (no GGUF files), fewer export.quantizations, export.merge false "
            "(adapter only), or a lower train.save_total_limit",
            code="insufficient_disk", details=details, param="export")
    stage = est.peak_stage
    if stage and est.ram_extra[stage] > free.ram:
        raise ExportResourcesError(
            f"not enough host RAM for the export: its largest stage, {stage}, needs {est.ram_extra[stage] / GB:.2f} GB "
            f"({est.basis[stage]}), {free.ram / GB:.2f} GB available ({free.ram_from}). Lower it in the spec: "
            + _ram_switch(stage), code="insufficient_memory", details=details, param="export")
    return est, free


def _ram_switch(stage: str) -> str:
    if stage == "evaluate":
        return "export.evaluate false, or a lower model.max_seq_length"
    if stage == "merge":
        return "export.merge false (adapter only)"
    return "export.gguf false (no GGUF files)" if stage.startswith(("gguf", "quantize", "mmproj")) else "export"


def preflight(spec: JobSpec, workdir: str | Path, *, eval_tokens: int | None = None,
              free: HostFree | None = None) -> dict[str, Any]:
    """:func:`check` for ``run_job``: the model's config, dtype and tokenizer files from where it
    resolves; evaluation on a GPU when CUDA is present. Returns ``{"estimate", "free"}`` (JSON-able,
    without paths)."""
    from trinity_core import gpu, model_config

    resolved = model_config.resolve(spec.model.name_or_path, spec.model.revision)
    config = model_config.load(spec.model.name_or_path, spec.model.revision)
    model_dir = Path(resolved.where).parent
    tokenizer = sum((model_dir / f).stat().st_size for f in TOKENIZER_FILES if (model_dir / f).is_file())
    est, free = check(spec, workdir, config=config, free=free, dtype_bytes=dtype_bytes(resolved.data),
                      tokenizer_bytes=tokenizer, eval_tokens=eval_tokens, cuda=gpu.available())
    # the numbers only: the workdir's path is the host's business (the API shows this dict)
    return {"estimate": est.to_dict(), "free": {k: v for k, v in asdict(free).items() if k != "where"}}


def kept_best_checkpoint(spec: Any) -> int:
    """1 when an older checkpoint may be kept beside the newest ones: the best evaluated step
    (``trinity_core.train.eval_loop``), exported with ``export.checkpoint = best``."""
    return int(bool(spec.train.eval_steps) and spec.export.checkpoint == "best")
