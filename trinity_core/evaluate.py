"""The report: base vs fine-tuned on the held-out split, export fidelity, the loss curve.

Every number is computed on the same token ids with the same loss mask as training
(:func:`trinity_core.template.tokenize_conversation`): the mean negative log-likelihood of the
assistant tokens, and its exponential, the perplexity. The models compared:

* ``base``: the 4-bit base, i.e. the trained model with its adapter disabled;
* ``fine_tuned``: the trained model itself (4-bit base + ``PeftModel.from_pretrained(adapter)``);
* ``merged``: the merged safetensors, loaded by transformers (fp32 on CPU);
* ``gguf_<type>``: each GGUF file in llama.cpp, log-probabilities taken from ``logits_all``.

For the exports, ``top1_agreement`` is the share of scored positions whose arg-max token equals the
fine-tuned model's. Side by side greedy generations show base and fine-tuned on ``eval_prompts``
held-out conversations cut before their last assistant turn.

Writes ``report/report.json``, ``report/report.md`` and ``report/loss.png``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from trinity_core.artifacts import atomic_file, atomic_write_json, atomic_write_text
from trinity_core.template import tokenize_conversation

Scored = tuple[list[int], list[int]]  # (input_ids, assistant_masks)


# --------------------------------------------------------------------------- models


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_trained_model(base_model: str | Path, adapter_dir: str | Path, *, revision: str | None = None,
                       load_in_4bit: bool = True, quant_type: str = "nf4", double_quant: bool = True,
                       compute_dtype: Any = None) -> Any:
    """The model as trained: the base loaded in 4 bits as the peft backend loads it, plus the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trinity_core.backends.common import quantized_load

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


def load_merged_model(merged_dir: str | Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype="auto" if _cuda() else torch.float32, device_map={"": 0} if _cuda() else None,
        attn_implementation="sdpa" if _cuda() else "eager").eval()


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


def score_hf(model: Any, examples: Sequence[Scored]) -> dict[str, Any]:
    """Held-out loss of a transformers model (one conversation at a time)."""
    import torch

    device = next(model.parameters()).device
    total = count = 0
    top1: list[int] = []
    with torch.no_grad():
        for ids, mask in examples:
            logits = model(torch.tensor([ids], device=device)).logits[0]
            nll, n, argmax = _score_logits(logits.cpu(), ids, mask)
            total, count, top1 = total + nll, count + n, top1 + argmax
    return _summary(total, count, top1)


def score_gguf(path: str | Path, examples: Sequence[Scored]) -> dict[str, Any]:
    """Held-out loss of a GGUF file in llama.cpp, from ``logits_all`` over the same token ids."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(len(ids) for ids, _ in examples) + 8
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                n_gpu_layers=-1 if _cuda() else 0, verbose=False)
    total = count = 0
    top1: list[int] = []
    try:
        for ids, mask in examples:
            llm.reset()
            llm.eval(ids)
            nll, n, argmax = _score_logits(np.array(llm.scores[: len(ids)]), ids, mask)
            total, count, top1 = total + nll, count + n, top1 + argmax
    finally:
        llm.close()
    return _summary(total, count, top1)


def _summary(total: float, count: int, top1: list[int]) -> dict[str, Any]:
    loss = total / count if count else float("nan")
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if count else None,
            "tokens": count, "_top1": top1}


def _agreement(a: list[int], b: list[int]) -> float | None:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 4) if a else None


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


def generate_side_by_side(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *,
                          max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy replies of the base (adapter disabled) and the fine-tuned model for each row."""
    import torch

    device = next(model.parameters()).device
    out = []
    for row in rows:
        prompt, reference = prompt_and_reference(row["messages"])
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        replies = {}
        for name in ("base", "fine_tuned"):
            with torch.no_grad(), (model.disable_adapter() if name == "base" else nullcontext()):
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            replies[name] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        out.append({"prompt": prompt[-1]["content"], "reference": reference, **replies})
    return out


# --------------------------------------------------------------------------- report


def plot_loss(loss_history: Sequence[dict[str, Any]], out_path: Path) -> Path | None:
    """``loss.png``: training loss per step (and the learning rate on a second axis)."""
    points = [h for h in loss_history if h.get("loss") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([h["step"] for h in points], [h["loss"] for h in points], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lrs = [h for h in points if h.get("lr") is not None]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in lrs], [h["lr"] for h in lrs], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("Training loss")
    fig.tight_layout()
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path


def _md(report: dict[str, Any]) -> str:
    lines = ["# Fine-tuning report", ""]
    held = report["held_out"]
    lines += [f"Held-out split: {held['rows']} conversations, {held['tokens']} assistant tokens scored.", ""]
    if report["models"]:
        lines += ["| model | loss | perplexity | top-1 agreement with fine-tuned |", "|---|---|---|---|"]
        for name, m in report["models"].items():
            agree = m.get("top1_agreement")
            lines.append(f"| {name} | {m['loss']:.4f} | {m['perplexity']} | {'' if agree is None else agree} |")
        lines.append("")
    if report["generations"]:
        lines += ["## Generations (greedy)", ""]
        for i, g in enumerate(report["generations"], 1):
            lines += [f"### {i}. {g['prompt']}", "", f"- **reference**: {g['reference']}",
                      f"- **base**: {g['base']}", f"- **fine-tuned**: {g['fine_tuned']}", ""]
    t = report["training"]
    if t["steps"]:
        lines += ["## Training", "", f"{t['steps']} logged steps, loss {t['first_loss']:.4f} → "
                  f"{t['last_loss']:.4f} (min {t['min_loss']:.4f}).", "", "![loss](loss.png)", ""]
    return "\n".join(lines)


def _score_all(trained_model: Any, examples: Sequence[Scored], merged_dir: str | Path | None,
               gguf_files: dict[str, Path] | None, load_merged: Callable[[Path], Any],
               emit: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    if not examples:
        return {}
    models: dict[str, dict[str, Any]] = {}
    with trained_model.disable_adapter():
        models["base"] = score_hf(trained_model, examples)
    models["fine_tuned"] = score_hf(trained_model, examples)
    emit(f"held-out perplexity: base {models['base']['perplexity']}, fine-tuned {models['fine_tuned']['perplexity']}",
         base=models["base"]["perplexity"], fine_tuned=models["fine_tuned"]["perplexity"])
    if merged_dir is not None:
        merged = load_merged(Path(merged_dir))
        models["merged"] = score_hf(merged, examples)
        del merged
        gc.collect()
    for qtype, path in (gguf_files or {}).items():
        models[f"gguf_{qtype}"] = score_gguf(path, examples)
    reference = models["fine_tuned"]["_top1"]
    for name, m in models.items():
        if name not in ("base", "fine_tuned"):
            m["top1_agreement"] = _agreement(reference, m["_top1"])
    for m in models.values():
        m.pop("_top1")
    return models


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
    load_merged: Callable[[Path], Any] = load_merged_model,
    emit: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Score base, fine-tuned and every export on ``eval_rows``; write ``workdir/report/``.

    ``trained_model`` is a ``PeftModel`` (see :func:`load_trained_model`); its base is scored with
    the adapter disabled. ``gguf_files`` maps a type (``f16``, ``q4_k_m``...) to its file.
    Returns the report dict (also ``report/report.json``).
    """
    emit = emit or (lambda *a, **k: None)
    t0 = time.monotonic()
    out = Path(workdir) / "report"
    examples = [tokenize_conversation(tokenizer, row["messages"], max_seq_length, truncate=True)
                for row in eval_rows]
    examples = [e for e in examples if any(e[1][1:])]
    with dora_cache(trained_model):
        models = _score_all(trained_model, examples, merged_dir, gguf_files, load_merged, emit)
        generations = generate_side_by_side(trained_model, tokenizer, list(eval_rows)[:eval_prompts],
                                            max_new_tokens=max_new_tokens) if eval_prompts else []
    losses = [h["loss"] for h in loss_history if h.get("loss") is not None]
    report = {
        "held_out": {"rows": len(examples), "tokens": models.get("base", {}).get("tokens", 0)},
        "models": models,
        "generations": generations,
        "training": {"steps": len(losses), "first_loss": losses[0] if losses else None,
                     "last_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None},
        "seconds": round(time.monotonic() - t0, 2),
    }
    plot_loss(loss_history, out / "loss.png")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _md(report))
    return report


def evaluate_job(spec: Any, workdir: str | Path, *, export: dict[str, Any], tokenizer: Any,
                 loss_history: Sequence[dict[str, Any]], emit: Callable[..., Any] | None = None,
                 compute_dtype: Any = None) -> dict[str, Any]:
    """:func:`evaluate` as the pipeline's stage: everything from the spec, the workdir and
    ``export`` (what :func:`trinity_core.export.export_all` returned)."""
    from trinity_core.data import read_jsonl

    workdir = Path(workdir)
    if compute_dtype is None:
        from trinity_core.backends.common import compute_dtype as resolve

        compute_dtype = resolve(spec)
    model = load_trained_model(spec.model.name_or_path, workdir / "adapter", revision=spec.model.revision,
                               load_in_4bit=spec.model.load_in_4bit, quant_type=spec.model.quant_type,
                               double_quant=spec.model.double_quant, compute_dtype=compute_dtype)
    return evaluate(
        workdir, trained_model=model, tokenizer=tokenizer, eval_rows=read_jsonl(workdir / "data" / "eval.jsonl"),
        max_seq_length=spec.model.max_seq_length, loss_history=loss_history,
        merged_dir=workdir / "merged" if export.get("merge") else None,
        gguf_files={q: workdir / p for q, p in (export.get("gguf") or {}).items()},
        eval_prompts=spec.export.eval_prompts, max_new_tokens=spec.export.max_new_tokens, emit=emit,
    )
