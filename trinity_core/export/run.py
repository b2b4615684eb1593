"""The export stage, top to bottom: merge -> GGUF f16 -> quantisations -> Modelfile.

``export_all`` is what ``run_job`` calls after training; the work lives in :mod:`trinity_core.export.merge`
(shard-streamed merge into the NF4-dequantised or original base) and :mod:`trinity_core.export.gguf`
(llama.cpp conversion, quantisation, checks, Ollama Modelfile). Layout written::

    workdir/merged/   model*.safetensors (+ index), config.json, tokenizer, trinity_merge.json
    workdir/gguf/     model-f16.gguf, model-q4_k_m.gguf..., Modelfile
                      + mmproj-f16.gguf for a multimodal base (vision tower + projector)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trinity_core.export.gguf import export_gguf
from trinity_core.export.merge import Quant, merge_adapter
from trinity_core.spec import JobSpec


def quant_of(spec: JobSpec, compute_dtype: str | None = None, dequant_dtype: str | None = None,
             quant_device: str | None = None) -> Quant | None:
    """How bitsandbytes quantised the base during training (None: it was not quantised).

    bitsandbytes quantises weights in the dtype the model is loaded in, which the backends set to
    the compute dtype (float32 on CPU, bfloat16 on most GPUs). ``dequant_dtype``: the dtype the
    trained model dequantised in, when it differs (``nf4.dequant_dtype_of(model)``); ``quant_device``:
    where its 4-bit layers live (the merge redoes the 4-bit arithmetic there, ``Quant.device``)."""
    if not spec.model.load_in_4bit:
        return None
    if compute_dtype is None:
        from trinity_core.train.backends.common import compute_dtype as resolve

        compute_dtype = str(resolve(spec)).removeprefix("torch.")
    # dequant_dtype is kept even when it equals the compute dtype: a pre-quantised base is otherwise
    # dequantised in the dtype its file serialised (merge.dequantize_prequantized), not the one the
    # trained model used (bf16 in the file, fp16 under Unsloth's T4 path)
    return Quant(quant_type=spec.model.quant_type, double_quant=spec.model.double_quant, dtype=compute_dtype,
                 dequant_dtype=dequant_dtype, device=quant_device)


def quantization_as_trained(spec: JobSpec, model: Any, asked: str | None, emit: Callable[..., Any]) -> dict[str, Any]:
    """``export_all``'s ``compute_dtype``, ``dequant_dtype`` and ``quant_device``, read off the trained
    ``model``: the dtype bitsandbytes really quantised a 16-bit base in (``merge.quantized_in``; not
    always ``asked``, the backend's compute dtype: Unsloth on an H200 quantised in bf16 when fp16 was
    asked), the one its 4-bit layers dequantise in (``nf4.dequant_dtype_of``) and the device they live
    on. Imports torch: call after the backend loaded."""
    from trinity_core.export.merge import quantized_in
    from trinity_core.nf4 import dequant_dtype_of

    quantized = None
    if spec.export.merge and spec.model.load_in_4bit and spec.export.merge_into == "dequantized":
        quantized = quantized_in(model, spec.model.name_or_path, spec.model.revision)
    if quantized is not None and quantized != asked:
        emit(f"bitsandbytes quantised the base in {quantized} (asked: {asked}); the merge does the same",
             quantized_in=quantized)
    device = next((str(p.device) for p in model.parameters() if getattr(p, "quant_state", None) is not None), None)
    return {"compute_dtype": quantized, "dequant_dtype": dequant_dtype_of(model), "quant_device": device}


def export_all(
    spec: JobSpec,
    workdir: str | Path,
    *,
    emit: Callable[..., Any],
    base_model: str | None = None,
    compute_dtype: str | None = None,
    dequant_dtype: str | None = None,
    quant_device: str | None = None,
) -> dict[str, Any]:
    """Merge ``workdir/adapter`` into the base, convert and quantise to GGUF, write the Modelfile.

    ``base_model``: the checkpoint training loaded (default ``spec.model.name_or_path``);
    ``compute_dtype``: the dtype training loaded it in (default: the backends' choice);
    ``dequant_dtype``: the dtype the trained model's 4-bit layers dequantise in, when known;
    ``quant_device``: the device they live on (the merge's 4-bit arithmetic runs there when it can).
    Returns ``{"merge": {...}, "gguf": {type: relative path}, "mmproj": relative path or None,
    "modelfile": path, "timings": {...}}``.
    Raises ``ExportError`` / ``ArtifactError``; nothing half-written is left under a final name.
    """
    workdir = Path(workdir)
    ex = spec.export
    result: dict[str, Any] = {"merge": None, "gguf": {}, "modelfile": None, "timings": {}}
    if not ex.merge:
        return result

    emit("merging the adapter into the base", type="status", stage="merge", merge_into=ex.merge_into)
    t0 = time.monotonic()
    result["merge"] = merge_adapter(
        workdir / "adapter", workdir / "merged",
        base_model=base_model or spec.model.name_or_path, revision=spec.model.revision,
        merge_into=ex.merge_into, original_model=ex.original_model,
        quant=quant_of(spec, compute_dtype, dequant_dtype, quant_device), emit=emit,
    )
    result["timings"]["merge_s"] = round(time.monotonic() - t0, 2)

    if ex.gguf:
        emit("converting to GGUF", type="status", stage="gguf", quantizations=list(ex.quantizations))
        t0 = time.monotonic()
        gguf = export_gguf(workdir / "merged", workdir / "gguf", list(ex.quantizations),
                           num_ctx=spec.model.max_seq_length, model_name=spec.name, emit=emit)
        result["gguf"] = {q: p.relative_to(workdir).as_posix() for q, p in gguf["files"].items() if q != "mmproj"}
        result["mmproj"] = gguf["mmproj"].relative_to(workdir).as_posix() if gguf["mmproj"] else None
        result["gguf_info"] = gguf["info"]
        result["modelfile"] = gguf["modelfile"].relative_to(workdir).as_posix()
        result["timings"].update({f"gguf_{q}_s": s for q, s in gguf["seconds"].items()})
        result["timings"]["gguf_s"] = round(time.monotonic() - t0, 2)
    return result
