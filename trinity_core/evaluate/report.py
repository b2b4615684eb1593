"""The report's files: ``loss.png`` (training loss and learning rate per step) and ``report.md``
(the verdict in words first, then the held-out table, caps, export checks, memory, the scored
generations), both from :func:`trinity_core.evaluate.run.evaluate`'s report dict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trinity_core.artifacts import atomic_file
from trinity_core.evaluate.verdict import headline


def plot_loss(loss_history: Sequence[dict[str, Any]], out_path: Path,
              eval_history: Sequence[dict[str, Any]] = ()) -> Path | None:
    """``loss.png``: training loss per step, the held-out loss at each evaluation during training
    (``eval_history``, its lowest point circled) and the learning rate on a
    second axis."""
    points = [h for h in loss_history if h.get("loss") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([h["step"] for h in points], [h["loss"] for h in points], color="tab:blue", label="train loss")
    evals = [h for h in eval_history if h.get("eval_loss") is not None]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], color="tab:green", marker="o",
                label="eval loss")
        best = min(evals, key=lambda h: h["eval_loss"])
        ax.scatter([best["step"]], [best["eval_loss"]], s=120, facecolors="none", edgecolors="tab:red",
                   label=f"lowest eval loss (step {best['step']})", zorder=3)
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lrs = [h for h in points if h.get("lr") is not None]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in lrs], [h["lr"] for h in lrs], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("Training and held-out loss" if evals else "Training loss")
    fig.tight_layout()
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Fine-tuning report", "", *headline(report["verdict"])]
    held, caps = report["held_out"], report["caps"]
    lines += [f"Held-out split: {held['rows']} conversations, {held['tokens']} assistant tokens scored "
              f"(caps: {caps['max_rows']} rows of {caps['rows_available']}, {caps['max_tokens']} tokens a row, "
              f"{caps['max_seconds']:g} s; {caps['rows_cut']} rows cut to the token cap).", ""]
    if report["models"]:
        lines += ["| model | rows | loss | perplexity | top-1 agreement with fine-tuned |", "|---|---|---|---|---|"]
        for name, m in report["models"].items():
            agree = m.get("top1_agreement")
            rows = f"{m['rows']}{' (time cap)' if m['stopped_on_time'] else ''}"
            lines.append(f"| {name} | {rows} | {m['loss']:.4f} | {m['perplexity']} | {'' if agree is None else agree} |")
        lines.append("")
    for name, why in report["skipped"].items():
        lines += [f"- {name} not scored: {why}"]
    weights = report["merged_weights"]
    if weights:
        lines += ["", "Merged weights vs the trained model: " + (weights.get("skipped") or (
            f"{weights['tensors']} tensors ({weights['adapted']} adapted), max |Δ| {weights['max_abs_diff']:.3g}, "
            + ("all match" if weights["ok"] else f"**{weights['mismatched_tensors']} mismatched**"))), ""]
    mem = report["memory"]
    if mem["gpu_peak_gib"] is not None:
        lines += [f"Peak GPU memory while evaluating: {mem['gpu_peak_gib']} GiB (training: {mem['training_peak_gib']}).", ""]
    if report["prompts"]:
        lines += ["## Generations (greedy), scored against the reference", ""]
        for i, p in enumerate(report["prompts"], 1):
            lines += [f"### {i}. {p['prompt']} — fine-tuned vs base: {p['outcome']}", "",
                      f"- **reference**: {p['reference']}"]
            for name, m in p["models"].items():
                lines.append(f"- **{name.replace('_', '-')}**: {m['text']}  \n  chrF {m['chrf']:.1f}, "
                             f"ROUGE-L {m['rouge_l']:.2f}, exact {m['exact_match']:.0f}, "
                             f"{'ended its turn' if m['stopped'] else 'did not end its turn'}")
            lines.append("")
    t = report["training"]
    if t["steps"]:
        lines += ["## Training", "", f"{t['steps']} logged steps, loss {t['first_loss']:.4f} → "
                  f"{t['last_loss']:.4f} (min {t['min_loss']:.4f}).", "", *_evaluation_lines(t),
                  "![loss](loss.png)", ""]
    return "\n".join(lines)


def _evaluation_lines(training: dict[str, Any]) -> list[str]:
    """The held-out loss during training and the step that was exported (trinity_core.train.eval_loop)."""
    lines = []
    evals = training.get("eval_history") or []
    if evals:
        lines += ["Held-out loss during training: " + ", ".join(f"step {h['step']} {h['eval_loss']:.4f}" for h in evals)
                  + f" ({evals[0]['rows']} rows each).", ""]
    choice = training.get("checkpoint") or {}
    if choice:
        lines += [f"Exported step {choice['step']} ({choice['checkpoint']}): {choice['why']}.", ""]
    return lines
