"""The verdict: did the fine-tune beat the base on this data, and by how much; do its replies end.

Each held-out prompt's greedy replies (base = adapter disabled, fine-tuned, and the fine-tuned GGUF in
llama.cpp) are scored against the reference reply with library metrics:

* **chrF** (``sacrebleu.sentence_chrf``, character 6-grams, β = 2; 0–100): the primary metric;
* **ROUGE-L** F-measure (Google's ``rouge-score``; its tokenizer keeps ASCII letters and digits only);
* **exact match**: equal after case folding and whitespace collapsing.

Per prompt the fine-tuned reply *wins* when its chrF beats the base's by more than
:data:`CHRF_TIE` points, *loses* when it is that much lower, else ties; the fine-tune *beat the base*
when it has more wins than losses. The report's first lines (:func:`headline`) say so in words,
with the mean metrics, the held-out loss and perplexity change, the share of replies that ended
their turn (emitted the turn terminator) within ``max_new_tokens``, and the GGUF's fidelity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trinity_core.evaluate.budget import Capped

CHRF_TIE = 1.0
"""chrF points (of 100) within which a prompt counts as a tie: replies that differ by less are not
called better or worse (the band is the report's choice, stated in its rule)."""

METRICS = ("chrf", "rouge_l", "exact_match")


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def text_metrics(reply: str, reference: str) -> dict[str, float]:
    """chrF, ROUGE-L F and exact match of ``reply`` against ``reference``."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    chrf = CHRF().sentence_score(reply, [reference]).score
    rouge = rouge_scorer.RougeScorer(["rougeL"]).score(reference, reply)["rougeL"].fmeasure
    exact = float(_normalise(reply) == _normalise(reference))
    return {"chrf": round(chrf, 2), "rouge_l": round(rouge, 4), "exact_match": exact}


def outcome(fine_tuned: float, base: float, tie: float = CHRF_TIE) -> str:
    return "win" if fine_tuned - base > tie else "loss" if base - fine_tuned > tie else "tie"


def generate_gguf(path: Any, prompts: Sequence[str], *, max_new_tokens: int, n_ctx: int,
                  deadline: float = float("inf")) -> list[dict[str, Any]]:
    """Greedy replies of a GGUF file in llama.cpp on the CPU, for rendered chat ``prompts`` (the first
    always, the others until ``deadline``): ``[{"text", "stopped"}]``. ``stopped``: llama.cpp ended the
    reply on an end-of-generation token (the turn terminator as the GGUF marks it), not on
    ``max_new_tokens``; no stop strings are given, so only the file's own tokens can stop it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_gpu_layers=0, seed=0, verbose=False)
    out = []
    try:
        for text in Capped(prompts, deadline):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # the template writes <bos>
            llm.reset()
            choice = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0,
                                           top_k=1)["choices"][0]
            out.append({"text": choice["text"].strip(), "stopped": choice["finish_reason"] == "stop"})
    finally:
        llm.close()
    return out


def score_prompts(generations: Sequence[dict[str, Any]], gguf: Sequence[dict[str, Any]] = (),
                  gguf_name: str | None = None) -> list[dict[str, Any]]:
    """``prompts[]``: per prompt, each model's reply, metrics and whether it ended its turn, and the
    fine-tuned vs base outcome. ``gguf[i]`` (from :func:`generate_gguf`) belongs to ``generations[i]``."""
    prompts = []
    for i, g in enumerate(generations):
        replies = {name: (g[name], g["stopped"][name]) for name in ("base", "fine_tuned")}
        if i < len(gguf) and gguf_name:
            replies[gguf_name] = (gguf[i]["text"], gguf[i]["stopped"])
        models = {name: {"text": text, **text_metrics(text, g["reference"]), "stopped": stopped}
                  for name, (text, stopped) in replies.items()}
        prompts.append({"prompt": g["prompt"], "reference": g["reference"], "models": models,
                        "outcome": outcome(models["fine_tuned"]["chrf"], models["base"]["chrf"])})
    return prompts


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def build_verdict(prompts: Sequence[dict[str, Any]], models: dict[str, dict[str, Any]], *, max_new_tokens: int,
                  gguf_name: str | None = None, terminator: str | None = None) -> dict[str, Any]:
    """The numbers behind the headline: wins/ties/losses, mean metrics, stop shares, held-out loss and
    perplexity change, and the GGUF's fidelity (``models`` is the report's held-out table)."""
    counts = {k: sum(p["outcome"] == k for p in prompts) for k in ("win", "tie", "loss")}
    names = ["base", "fine_tuned"] + ([gguf_name] if gguf_name else [])
    mean, stops = {}, {}
    for name in names:
        scored = [p["models"][name] for p in prompts if name in p["models"]]
        mean[name] = {m: _mean([s[m] for s in scored]) for m in METRICS} | {"prompts": len(scored)}
        stops[name] = {"stopped": sum(s["stopped"] for s in scored), "prompts": len(scored),
                       "share": _mean([float(s["stopped"]) for s in scored])}
    wins, losses = counts["win"], counts["loss"]
    verdict: dict[str, Any] = {
        "outcome": "no_prompts" if not prompts else "better" if wins > losses else "worse" if losses > wins else "even",
        "metric": "chrf", "tie_points": CHRF_TIE, "prompts": len(prompts),
        "wins": wins, "ties": counts["tie"], "losses": losses,
        "rule": (f"per held-out prompt, the fine-tuned greedy reply wins when its chrF against the reference is more "
                 f"than {CHRF_TIE:g} point above the base's, loses when it is that much below, else ties; the "
                 "fine-tune beat the base when wins > losses"),
        "mean": mean,
        "stop_share": {"max_new_tokens": max_new_tokens, "terminator": terminator, **stops},
        "held_out": _held_out(models),
        "gguf": _gguf_fidelity(models, prompts, gguf_name) if gguf_name else None,
    }
    return verdict


def _held_out(models: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    base, tuned = models.get("base"), models.get("fine_tuned")
    if not base or not tuned or base.get("perplexity") is None:
        return None
    return {"base_loss": base["loss"], "fine_tuned_loss": tuned["loss"],
            "loss_change": round(tuned["loss"] - base["loss"], 6),
            "base_perplexity": base["perplexity"], "fine_tuned_perplexity": tuned["perplexity"],
            "perplexity_change": round(tuned["perplexity"] - base["perplexity"], 4)}  # fmt: skip


def _gguf_fidelity(models: dict[str, dict[str, Any]], prompts: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    scored = models.get(name) or {}
    tuned = models.get("fine_tuned") or {}
    both = [p for p in prompts if name in p["models"]]
    same = sum(_normalise(p["models"][name]["text"]) == _normalise(p["models"]["fine_tuned"]["text"]) for p in both)
    loss = scored.get("loss")
    return {"model": name, "loss": loss, "top1_agreement": scored.get("top1_agreement"),
            "loss_change_vs_fine_tuned": round(loss - tuned["loss"], 6) if loss is not None and tuned else None,
            "same_reply_as_fine_tuned": same, "prompts": len(both)}  # fmt: skip


# --------------------------------------------------------------------------- words


def headline(verdict: dict[str, Any] | None) -> list[str]:
    """The report's first lines: the verdict in plain words, then how it was measured."""
    if not verdict or verdict["outcome"] == "no_prompts":
        return ["**No verdict**: no held-out prompt was generated (export.eval_prompts 0, no eval rows, or every "
                "prompt over the token cap).", ""]
    v, m = verdict, verdict["mean"]
    n, base, tuned = v["prompts"], m["base"]["chrf"], m["fine_tuned"]["chrf"]
    said = {"better": "**The fine-tune beat the base on this data**",
            "worse": "**The fine-tune did worse than the base on this data**",
            "even": "**The fine-tune did not beat the base on this data** (as many wins as losses)"}[v["outcome"]]
    lines = [f"{said}: its reply was closer to the reference (chrF) on {v['wins']} of {n} held-out prompts, "
             f"as close on {v['ties']}, further on {v['losses']}; mean chrF {base:.1f} → {tuned:.1f} "
             f"({tuned - base:+.1f}), ROUGE-L {m['base']['rouge_l']:.2f} → {m['fine_tuned']['rouge_l']:.2f}, "
             f"exact match {m['base']['exact_match']:.0%} → {m['fine_tuned']['exact_match']:.0%}."]
    if h := v["held_out"]:
        lines.append(f"Held-out loss {h['base_loss']:.3f} → {h['fine_tuned_loss']:.3f} ({h['loss_change']:+.3f}), "
                     f"perplexity {h['base_perplexity']:.4g} → {h['fine_tuned_perplexity']:.4g}.")
    s = v["stop_share"]
    ended = [f"{label} {s[name]['stopped']}/{s[name]['prompts']}" for name, label in
             (("base", "base (transformers)"), ("fine_tuned", "fine-tuned (transformers)"))]
    if (g := v["gguf"]) and g["model"] in s:
        ended.append(f"fine-tuned {g['model'].removeprefix('gguf_')} GGUF (llama.cpp) "
                     f"{s[g['model']]['stopped']}/{s[g['model']]['prompts']}")
    lines.append(f"Replies that ended their turn ({s['terminator'] or 'end of turn'}) within {s['max_new_tokens']} "
                 f"new tokens: {', '.join(ended)}.")
    if g and g["loss"] is not None:
        lines.append(f"GGUF {g['model'].removeprefix('gguf_')} fidelity: held-out loss {g['loss']:.3f} "
                     f"({g['loss_change_vs_fine_tuned']:+.3f} vs fine-tuned), top-1 agreement {g['top1_agreement']}, "
                     f"same greedy reply as fine-tuned on {g['same_reply_as_fine_tuned']} of {g['prompts']} prompts.")
    elif g:
        lines.append(f"GGUF {g['model'].removeprefix('gguf_')}: same greedy reply as fine-tuned on "
                     f"{g['same_reply_as_fine_tuned']} of {g['prompts']} prompts.")
    lines += ["", f"How: greedy replies to the first {n} held-out prompts, scored against the reference reply "
              "with sacrebleu's chrF (primary), rouge-score's ROUGE-L F and exact match (case and whitespace "
              f"folded); {v['rule']}. Per prompt: `prompts[]` in report.json.", ""]
    return lines
