"""The report: base vs fine-tuned on the held-out split, export fidelity, the loss curve.

Every number is computed on the same token ids with the same loss mask as training
(:func:`trinity_core.data.template.tokenize_conversation`): the mean negative log-likelihood of the
assistant tokens, and its exponential, the perplexity. The models compared:

* ``base``: the 4-bit base, i.e. the trained model with its adapter disabled;
* ``fine_tuned``: the trained model itself (4-bit base + ``PeftModel.from_pretrained(adapter)``);
* ``merged``: the merged safetensors, loaded by transformers in fp32 **on the CPU**, and only when
  they are at most :data:`MERGED_LOGITS_MAX_BYTES` (the tiny models; never a 12B);
* ``gguf_<type>``: each GGUF file in llama.cpp **on the CPU**, log-probabilities from ``logits_all``.

For the exports, ``top1_agreement`` is the share of scored positions whose arg-max token equals the
fine-tuned model's (over the rows both scored). Side by side greedy generations show base and
fine-tuned on ``eval_prompts`` held-out conversations cut before their last assistant turn.

Inside a T4's memory: one model is on the GPU, the trained one (4-bit base + adapter; the base is
scored with the adapter disabled). The merged checkpoint is checked weight by weight against it
(:mod:`trinity_core.evaluate.merge_check`, streamed from disk, exact by construction for the dequantised
merge) instead of being loaded, and the GGUF files run on the CPU. Rows, tokens per row and
seconds are capped (:mod:`trinity_core.evaluate.budget`); the report says what was capped and the
peak memory of each stage (``memory``).

Writes ``report/report.json``, ``report/report.md`` and ``report/loss.png``.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from trinity_core import gpu
from trinity_core.artifacts import atomic_write_json, atomic_write_text
from trinity_core.data.label_audit import turn_terminator
from trinity_core.data.template import tokenize_conversation
from trinity_core.evaluate.budget import Capped, Caps, Clock, Stages
from trinity_core.evaluate.report import plot_loss, render_markdown
from trinity_core.evaluate.verdict import build_verdict, generate_gguf, headline, score_prompts

Scored = tuple[list[int], list[int]]  # (input_ids, assistant_masks)

GGUF_RAM_MARGIN = 1 << 30
"""Host RAM a GGUF needs in llama.cpp besides the file itself: the logits of a scored row
(``logits_all``: tokens × vocabulary × 4 bytes, 0.5 GiB at 512 tokens of Gemma-3's 262k), the KV cache
and compute buffers."""
MERGED_LOGITS_MAX_BYTES = 1 << 30
"""Merged safetensors up to this size (~0.5B parameters in 16 bits; 4 GiB of host RAM once in fp32)
are also loaded on the CPU and scored; above it the weight check alone stands for the merge."""


# --------------------------------------------------------------------------- models


def _cuda() -> bool:
    return gpu.available()


def load_trained_model(base_model: str | Path, adapter_dir: str | Path, *, revision: str | None = None,
                       load_in_4bit: bool = True, quant_type: str = "nf4", double_quant: bool = True,
                       compute_dtype: Any = None) -> Any:
    """The model as trained: the base loaded in 4 bits as the peft backend loads it, plus the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trinity_core.train.backends.common import quantized_load

    dtype = compute_dtype or (torch.bfloat16 if _cuda() else torch.float32)
    # The same 4-bit settings as the peft backend: a pre-quantised base keeps its packed weights
    # (and, multimodal, its 16-bit vision tower), a 16-bit one is quantised the same way.
    load = quantized_load(str(base_model), revision, load_in_4bit=load_in_4bit, quant_type=quant_type,
                          double_quant=double_quant, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        base_model, revision=revision, **load, dtype=dtype,
        device_map={"": 0} if _cuda() else None, attn_implementation="sdpa" if _cuda() else "eager")
    if not _cuda():
        from trinity_core import nf4

        nf4.exact_on_cpu(model)  # else bitsandbytes scores in bf16 on AVX-512 BF16 CPUs
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def load_merged_model(merged_dir: str | Path, *, on_gpu: bool | None = None) -> Any:
    """The merged model: on GPU 0 in its stored dtype (``on_gpu``, default: when CUDA exists), else fp32
    on the CPU (what the report does)."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu = _cuda() if on_gpu is None else on_gpu
    return AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype="auto" if gpu else torch.float32, device_map={"": 0} if gpu else None,
        attn_implementation="sdpa" if gpu else "eager").eval()


# --------------------------------------------------------------------------- scoring


def _score_logits(logits: Any, ids: list[int], mask: list[int]) -> tuple[float, int, list[int]]:
    """Summed NLL of the masked tokens, their count and the arg-max prediction at each of them.

    ``logits[i]`` predicts ``ids[i + 1]``; a token is scored when its own mask is 1."""
    import torch

    logits = torch.as_tensor(logits).float()
    pos = [i for i in range(1, len(ids)) if mask[i]]
    if not pos:
        return 0.0, 0, []
    rows = logits[[p - 1 for p in pos]]
    logp = torch.log_softmax(rows, dim=-1)
    targets = torch.tensor([ids[p] for p in pos])
    nll = -logp.gather(1, targets[:, None]).sum().item()
    return nll, len(pos), rows.argmax(-1).tolist()


def score_hf(model: Any, examples: Sequence[Scored], deadline: float = float("inf")) -> dict[str, Any]:
    """Held-out loss of a transformers model (one conversation at a time; the first always, the
    others until ``deadline``, a ``time.monotonic()`` value)."""
    import torch

    device = next(model.parameters()).device
    total = count = 0
    top1: list[list[int]] = []
    rows = Capped(examples, deadline)
    with torch.no_grad():
        for ids, mask in rows:
            logits = model(torch.tensor([ids], device=device)).logits[0]
            nll, n, argmax = _score_logits(logits.cpu(), ids, mask)
            del logits
            total, count = total + nll, count + n
            top1.append(argmax)
    return _summary(total, count, top1, rows)


def score_gguf(path: str | Path, examples: Sequence[Scored], deadline: float = float("inf")) -> dict[str, Any]:
    """Held-out loss of a GGUF file in llama.cpp on the CPU, from ``logits_all`` over the same token
    ids (an f16 12B would not fit a T4 beside the trained model). ``deadline`` as in :func:`score_hf`."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(len(ids) for ids, _ in examples) + 8
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                n_gpu_layers=0, verbose=False)
    total = count = 0
    top1: list[list[int]] = []
    rows = Capped(examples, deadline)
    try:
        for ids, mask in rows:
            llm.reset()
            llm.eval(ids)
            nll, n, argmax = _score_logits(np.array(llm.scores[: len(ids)]), ids, mask)
            total, count = total + nll, count + n
            top1.append(argmax)
    finally:
        llm.close()
    return _summary(total, count, top1, rows)


def _summary(total: float, count: int, top1: list[list[int]], rows: Capped) -> dict[str, Any]:
    loss = total / count if count else float("nan")
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if count else None,
            "tokens": count, "rows": rows.done, "stopped_on_time": rows.stopped_on_time, "_top1": top1}


def _agreement(a: list[list[int]], b: list[list[int]]) -> float | None:
    """Share of equal arg-max tokens over the rows both scored."""
    n = min(len(a), len(b))
    flat_a, flat_b = [x for row in a[:n] for x in row], [x for row in b[:n] for x in row]
    return round(sum(x == y for x, y in zip(flat_a, flat_b, strict=True)) / len(flat_a), 4) if flat_a else None


# --------------------------------------------------------------------------- generation


def prompt_and_reference(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The conversation up to its last assistant turn, and that turn's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


DORA_CACHE_MAX_ELEMENTS = 1 << 28  # 1 GiB of fp32


@contextmanager
def dora_cache(model: Any) -> Iterator[None]:
    """Let PEFT cache DoRA's weight norms and ``B @ A`` between forward passes (6x faster greedy
    generation on the tiny model), when that cache (one full matrix per adapted module) is small."""
    import peft.tuners.lora.dora as dora

    size = sum(m.in_features * m.out_features for m in model.modules() if getattr(m, "lora_magnitude_vector", None))
    before = dora.ENABLE_DORA_CACHING
    dora.ENABLE_DORA_CACHING = before or size <= DORA_CACHE_MAX_ELEMENTS
    try:
        yield
    finally:
        dora.ENABLE_DORA_CACHING = before
        for m in model.modules():
            if hasattr(m, "_cache_clear"):
                m._cache_clear()


def generate_side_by_side(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int,
                          max_prompt_tokens: int | None = None, deadline: float = float("inf"),
                          skipped: dict[str, Any] | None = None, stop_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Greedy replies of the base (adapter disabled) and the fine-tuned model for each row (the first
    always, the others until ``deadline``). A prompt over ``max_prompt_tokens`` is skipped and counted
    in ``skipped["long_prompts"]``; ``skipped["stopped_on_time"]`` says whether the deadline cut in.
    Generation ends on any of ``stop_ids`` (default: the tokenizer's eos); ``stopped[name]`` says whether
    that reply emitted one within ``max_new_tokens``, and ``_prompt`` holds the rendered prompt."""
    import torch

    device = next(model.parameters()).device
    stop = sorted({*stop_ids, tokenizer.eos_token_id} - {None})
    out = []
    skipped = {} if skipped is None else skipped
    skipped.setdefault("long_prompts", 0)
    todo = Capped(rows, deadline)
    for row in todo:
        prompt, reference = prompt_and_reference(row["messages"])
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        if max_prompt_tokens is not None and ids.shape[1] > max_prompt_tokens:
            skipped["long_prompts"] += 1
            continue
        replies, stopped = {}, {}
        for name in ("base", "fine_tuned"):
            with torch.no_grad(), (model.disable_adapter() if name == "base" else nullcontext()):
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
            new_ids = gen[0, ids.shape[1]:].tolist()
            replies[name] = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
            stopped[name] = any(t in stop for t in new_ids)
        out.append({"prompt": prompt[-1]["content"], "reference": reference, **replies, "stopped": stopped,
                    "_prompt": text})
    skipped["stopped_on_time"] = todo.stopped_on_time
    return out


# --------------------------------------------------------------------------- report


def _merged_size(merged_dir: Path) -> int:
    return sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))


def gguf_too_big(path: Path, free_ram: Callable[[], int]) -> str | None:
    """Why llama.cpp should not load ``path`` now, or None when it fits the host RAM free now.

    llama.cpp maps the whole file and reads all of it for every batch of tokens; past the RAM free
    (a container's or a cgroup's limit included: ``export.resources.host_free``) it pages the file
    through the cache for every row, and under a cgroup limit the kernel may kill the job instead
    (H200, 2026-11-28: the 12.2 GB f16 GGUF of the 24-layer stand-in in an 8e9-byte cgroup, beside
    the trained model's process, OOM-killed the job in evaluation after its export had finished)."""
    need, free = path.stat().st_size + GGUF_RAM_MARGIN, free_ram()
    if need <= free:
        return None
    return (f"{path.name}: {path.stat().st_size / 2**30:.2f} GiB file + {GGUF_RAM_MARGIN / 2**30:.0f} GiB for "
            f"llama.cpp > {free / 2**30:.2f} GiB of host RAM free; the file is written and complete, not scored here")


def _score_all(trained_model: Any, examples: Sequence[Scored], merged_dir: Path | None,
               gguf_files: dict[str, Path], load_merged: Callable[[Path], Any], emit: Callable[..., Any],
               clock: Clock, stages: Stages, skipped: dict[str, str],
               free_ram: Callable[[], int]) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    with stages("score base"), trained_model.disable_adapter():
        models["base"] = score_hf(trained_model, examples, clock.share())
    with stages("score fine_tuned"):
        models["fine_tuned"] = score_hf(trained_model, examples, clock.share())
    emit(f"held-out perplexity: base {models['base']['perplexity']}, fine-tuned {models['fine_tuned']['perplexity']}",
         base=models["base"]["perplexity"], fine_tuned=models["fine_tuned"]["perplexity"])
    if merged_dir is not None and "merged" not in skipped:
        with stages("score merged (CPU)"):
            merged = load_merged(merged_dir)
            models["merged"] = score_hf(merged, examples, clock.share())
            del merged
            gc.collect()
    for qtype, path in gguf_files.items():
        if why := gguf_too_big(path, free_ram):
            skipped[f"gguf_{qtype}"] = why
            emit(f"not scoring gguf_{qtype}: {why}", level="warning")
            clock.share()  # its share of the time passes on to the tasks after it
            continue
        with stages(f"score gguf_{qtype} (CPU)"):
            models[f"gguf_{qtype}"] = score_gguf(path, examples, clock.share())
    reference = models["fine_tuned"]["_top1"]
    for name, m in models.items():
        if name not in ("base", "fine_tuned"):
            m["top1_agreement"] = _agreement(reference, m["_top1"])
    for m in models.values():
        m.pop("_top1")
    return models


def _check_weights(trained_model: Any, merged_dir: Path | None, stages: Stages, emit: Callable[..., Any]) -> dict:
    if merged_dir is None:
        return {}
    info_file = merged_dir / "trinity_merge.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("merge_into") == "original":
        return {"skipped": "merge_into=original: differs from the trained model by the NF4 rounding, by design"}
    from trinity_core.evaluate.merge_check import check_merged_weights

    with stages("check merged weights"):
        result = check_merged_weights(trained_model, merged_dir)
    emit(f"merged weights vs trained model: {result['tensors']} tensors, max |Δ| {result['max_abs_diff']:.3g}, "
         + ("all match" if result["ok"] else f"{result['mismatched_tensors']} mismatched"),
         level="info" if result["ok"] else "warning", ok=result["ok"], max_abs_diff=result["max_abs_diff"])
    return result


def evaluate(
    workdir: str | Path,
    *,
    trained_model: Any,
    tokenizer: Any,
    eval_rows: Sequence[dict[str, Any]],
    max_seq_length: int,
    loss_history: Sequence[dict[str, Any]] = (),
    merged_dir: str | Path | None = None,
    gguf_files: dict[str, Path] | None = None,
    eval_prompts: int = 4,
    max_new_tokens: int = 48,
    caps: Caps = Caps(),
    load_merged: Callable[[Path], Any] = partial(load_merged_model, on_gpu=False),
    merged_logits_max_bytes: int = MERGED_LOGITS_MAX_BYTES,
    training_peak_gib: float | None = None,
    stages: Stages | None = None,
    emit: Callable[..., Any] | None = None,
    eval_history: Sequence[dict[str, Any]] = (),
    checkpoint: dict[str, Any] | None = None,
    free_ram: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Score base, fine-tuned and every export on the first ``caps.max_rows`` of ``eval_rows``; check
    the merged weights; write ``workdir/report/``.

    ``trained_model`` is a ``PeftModel`` (see :func:`load_trained_model`); its base is scored with
    the adapter disabled. ``gguf_files`` maps a type (``f16``, ``q4_k_m``...) to its file. ``stages``
    may hold stages measured before (the model's load); ``training_peak_gib`` is set beside them.
    ``free_ram``: bytes of host RAM free now (default: ``export.resources.host_free``); a GGUF that
    does not fit is not loaded (:func:`gguf_too_big`) and the report says so under ``skipped``.
    Returns the report dict (also ``report/report.json``).
    """
    emit = emit or (lambda *a, **k: None)
    if free_ram is None:
        from trinity_core.export.resources import host_free

        def free_ram() -> int:
            return host_free(workdir).ram
    stages = stages or Stages()
    t0 = time.monotonic()
    out = Path(workdir) / "report"
    merged_dir = Path(merged_dir) if merged_dir is not None else None
    gguf_files = dict(gguf_files or {})
    rows = list(eval_rows)[: caps.max_rows]
    limit = min(max_seq_length, caps.max_tokens)
    examples = [tokenize_conversation(tokenizer, row["messages"], limit, truncate=True) for row in rows]
    cut = sum(len(tokenize_conversation(tokenizer, row["messages"], max_seq_length, truncate=True)[0]) > limit
              for row in rows) if limit < max_seq_length else 0
    examples = [e for e in examples if any(e[1][1:])]
    skipped: dict[str, str] = {}
    if merged_dir is not None and (size := _merged_size(merged_dir)) > merged_logits_max_bytes:
        skipped["merged"] = (f"{size / 2**30:.2f} GiB of safetensors > the {merged_logits_max_bytes / 2**30:.2f} GiB "
                             "threshold for loading it on the CPU; see merged_weights")
    elif merged_dir is not None and "unsloth" in sys.modules:
        # Unsloth patched the Gemma-3 classes of this process (its forward casts to the training dtype):
        # a model loaded now would not compute as transformers does (H200, 2026-11-28: "Half != float")
        skipped["merged"] = "unsloth is imported in this process and patches newly loaded models; see merged_weights"
    prompts = rows[: eval_prompts]
    gguf_gen = next((q for q in ("q4_k_m", *gguf_files) if q in gguf_files), None) if prompts else None
    tasks = (2 + (merged_dir is not None and "merged" not in skipped) + len(gguf_files)) * bool(examples) \
        + bool(prompts) + bool(gguf_gen)
    terminator = turn_terminator(tokenizer, required=False)  # None: generation stops on eos alone
    clock = Clock(caps.max_seconds, tasks)
    gen_skipped: dict[str, Any] = {}
    with dora_cache(trained_model):
        models = _score_all(trained_model, examples, merged_dir, gguf_files, load_merged, emit, clock, stages,
                            skipped, free_ram) if examples else {}
        weights = _check_weights(trained_model, merged_dir, stages, emit)
        with stages("generate"):
            generations = generate_side_by_side(trained_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                max_prompt_tokens=caps.max_tokens, deadline=clock.share(),
                                                skipped=gen_skipped, stop_ids=[terminator.id] if terminator else [])
    gguf_replies = []
    if gguf_gen and generations and (why := gguf_too_big(gguf_files[gguf_gen], free_ram)):
        skipped[f"generations gguf_{gguf_gen}"] = why
        emit(f"not generating with gguf_{gguf_gen}: {why}", level="warning")
        gguf_gen = None
    if gguf_gen and generations:
        with stages(f"generate gguf_{gguf_gen} (CPU)"):
            gguf_replies = generate_gguf(gguf_files[gguf_gen], [g.pop("_prompt") for g in generations],
                                         max_new_tokens=max_new_tokens, n_ctx=caps.max_tokens + max_new_tokens + 8,
                                         deadline=clock.share())
    for g in generations:
        g.pop("_prompt", None)
    gguf_name = f"gguf_{gguf_gen}" if gguf_replies else None
    scored_prompts = score_prompts(generations, gguf_replies, gguf_name)
    verdict = build_verdict(scored_prompts, models, max_new_tokens=max_new_tokens, gguf_name=gguf_name,
                            terminator=terminator.token if terminator else None)
    emit(headline(verdict)[0].replace("**", ""), **{k: verdict[k] for k in ("outcome", "wins", "ties", "losses")})
    losses = [h["loss"] for h in loss_history if h.get("loss") is not None]
    report = {
        "verdict": verdict,
        "prompts": scored_prompts,
        "held_out": {"rows": len(examples), "tokens": models.get("base", {}).get("tokens", 0)},
        "models": models,
        "merged_weights": weights,
        "skipped": skipped,
        "generations": generations,
        "caps": {**caps.to_dict(), "rows_available": len(eval_rows), "rows_capped": len(eval_rows) > caps.max_rows,
                 "rows_cut": cut, "stopped_on_time": [n for n, m in models.items() if m["stopped_on_time"]]
                 + (["generations"] if gen_skipped.get("stopped_on_time") else [])
                 + ([f"generations_{gguf_name}"] if gguf_name and len(gguf_replies) < len(generations) else []),
                 "long_prompts_skipped": gen_skipped.get("long_prompts", 0)},
        "memory": stages.summary(training_peak_gib),
        "training": {"steps": len(losses), "first_loss": losses[0] if losses else None,
                     "last_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None},
        "seconds": round(time.monotonic() - t0, 2),
    }
    report["training"].update(eval_history=list(eval_history), checkpoint=checkpoint or {})  # eval_loop's
    plot_loss(loss_history, out / "loss.png", eval_history=eval_history)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def evaluate_job(spec: Any, workdir: str | Path, *, export: dict[str, Any], tokenizer: Any,
                 loss_history: Sequence[dict[str, Any]], emit: Callable[..., Any] | None = None,
                 compute_dtype: Any = None, training_peak_gib: float | None = None,
                 model: Any = None, eval_history: Sequence[dict[str, Any]] = (),
                 checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`evaluate` as the pipeline's stage: everything from the spec, the workdir and
    ``export`` (what :func:`trinity_core.export.run.export_all` returned); ``training_peak_gib`` (the
    training's peak GPU memory) goes in the report beside evaluation's own. ``model``: the trained
    PeftModel still in memory (run_job passes it: under Unsloth a second load in the same process
    computes in the dtypes Unsloth patched in, "Half != BFloat16" on the T4 path, H200 2026-11-28);
    ``None`` loads the base + ``workdir/adapter``."""
    from trinity_core.data.prepare import read_jsonl

    workdir = Path(workdir)
    if compute_dtype is None:
        import torch

        from trinity_core import model_config
        from trinity_core.train.backends.common import compute_dtype as resolve

        compute_dtype = resolve(spec)
        model_type = str(model_config.resolve(spec.model.name_or_path, spec.model.revision).data.get("model_type", ""))
        if compute_dtype == torch.float16 and model_type.startswith("gemma3"):
            # as training ran it: Unsloth computes Gemma-3 in fp32 when fp16 is asked for (a T4), and
            # fp16 next to the checkpoint's bf16 parts fails ("Half != BFloat16", H200 2026-11-28)
            compute_dtype = torch.float32
    stages = Stages()
    if model is not None:  # the model training left in memory: no second copy, no reload in another dtype
        model.eval()
    else:
        with stages("load trained model"):
            model = load_trained_model(spec.model.name_or_path, workdir / "adapter", revision=spec.model.revision,
                                       load_in_4bit=spec.model.load_in_4bit, quant_type=spec.model.quant_type,
                                       double_quant=spec.model.double_quant, compute_dtype=compute_dtype)
    ex = spec.export
    return evaluate(
        workdir, trained_model=model, tokenizer=tokenizer, eval_rows=read_jsonl(workdir / "data" / "eval.jsonl"),
        max_seq_length=spec.model.max_seq_length, loss_history=loss_history,
        merged_dir=workdir / "merged" if export.get("merge") else None,
        gguf_files={q: workdir / p for q, p in (export.get("gguf") or {}).items()},
        eval_prompts=ex.eval_prompts, max_new_tokens=ex.max_new_tokens, emit=emit, stages=stages,
        caps=Caps(ex.eval_max_rows, ex.eval_max_tokens, ex.eval_max_seconds), training_peak_gib=training_peak_gib,
        eval_history=eval_history, checkpoint=checkpoint,
    )
