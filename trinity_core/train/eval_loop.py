"""Evaluation during training: the held-out loss every ``train.eval_steps``, early stopping, the best step.

At every ``train.eval_steps``-th optimizer step and at the last one, :class:`EvalCallback` scores the
first ``train.eval_max_rows`` rows of the held-out split (cut to ``train.eval_max_tokens`` tokens and
the rung's ``max_seq_length``) with the model as it trains, emits an ``eval`` event, and asks for a
checkpoint at that step, so the step with the lowest eval loss can always be exported. The loss is
the one training and the report use: the mean NLL of the assistant tokens (the same ids and mask).

Cost is bounded like the report's (:mod:`trinity_core.evaluate.budget`): the first evaluation may use
``train.eval_max_seconds`` (at least one row); the rows it scored in that time are the rows every
later evaluation scores, so the losses of all steps are over the same rows and compare.

State travels with the checkpoints: each ``checkpoints/step-N/trinity_eval.json`` holds that step's
eval loss and the whole :class:`EvalState` (history, best so far, evaluations since the best, the row
count), so a resumed run continues it, the API lists each checkpoint's eval loss, and the pruning of
old checkpoints keeps the best one.

Why not the Trainer's own ``eval_strategy``/``EarlyStoppingCallback``/``load_best_model_at_end``:
our checkpoints are our own (``step-N``, renamed when complete, pruned by us), the Trainer's
evaluation has no time cap, and its best-model bookkeeping lives in ``trainer_state.json`` under its
own checkpoint names. One callback of ours is less to reconcile.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trinity_core.artifacts import atomic_write_json
from trinity_core.evaluate.budget import Capped
from trinity_core.events import Emitter

EVAL_FILE = "trinity_eval.json"
Example = tuple[list[int], list[int]]  # (input_ids, assistant_masks)


def eval_examples(eval_dataset: Any, *, max_rows: int, max_tokens: int) -> list[Example]:
    """The first ``max_rows`` tokenised held-out rows, cut to ``max_tokens``; rows left without a
    scored token (the first token is never predicted) are dropped."""
    if eval_dataset is None or len(eval_dataset) == 0:
        return []
    out = []
    for row in eval_dataset.select(range(min(max_rows, len(eval_dataset)))):
        ids, mask = list(row["input_ids"])[:max_tokens], [int(m) for m in row["assistant_masks"]][:max_tokens]
        if any(mask[1:]):
            out.append((ids, mask))
    return out


def held_out_loss(model: Any, examples: list[Example], deadline: float = math.inf) -> dict[str, Any]:
    """Mean NLL of the assistant tokens over ``examples`` (the first always, the others until
    ``deadline``), one row at a time. The model computes it from ``labels`` (the prompt masked with
    -100) on its own device: no vocabulary-sized logits leave the GPU, and Unsloth's fused loss applies."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = Capped(examples, deadline)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, mask in rows:
                labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
                out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device),
                            use_cache=False)
                n = sum(1 for m in mask[1:] if m)
                total, count = total + float(out.loss) * n, count + n
    finally:
        if was_training:
            model.train()
    return {"eval_loss": total / count if count else math.nan, "rows": rows.done, "tokens": count,
            "stopped_on_time": rows.stopped_on_time}


@dataclass
class EvalState:
    """What the evaluations so far decided; saved in each checkpoint, restored on resume."""

    history: list[dict[str, Any]] = field(default_factory=list)  # [{step, eval_loss, rows, tokens, seconds}]
    best_step: int | None = None
    best_eval_loss: float | None = None
    since_best: int = 0  # evaluations since the best one
    rows: int | None = None  # fixed by the first evaluation
    early_stopped: dict[str, Any] | None = None

    def record(self, step: int, scored: dict[str, Any], seconds: float) -> bool:
        """Add one evaluation; True when it is a new best (strictly lower loss)."""
        loss = round(scored["eval_loss"], 6)  # as stored in result.json: the comparisons see what it shows
        self.history = [h for h in self.history if h["step"] < step]  # a step re-run after a resume replaces its entry
        self.history.append({"step": step, "eval_loss": loss, "rows": scored["rows"], "tokens": scored["tokens"],
                             "seconds": round(seconds, 2)})
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_step, self.best_eval_loss, self.since_best = step, loss, 0
            return True
        self.since_best += 1
        return False

    def loss_at(self, step: int) -> float | None:
        return next((h["eval_loss"] for h in self.history if h["step"] == step), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, checkpoint_dir: Path, step: int) -> None:
        """``trinity_eval.json`` in a checkpoint being completed (before it is renamed to ``step-N``)."""
        atomic_write_json(checkpoint_dir / EVAL_FILE, {"step": step, "eval_loss": self.loss_at(step),
                                                       "state": self.to_dict()})

    @classmethod
    def load(cls, checkpoint_dir: Path) -> EvalState | None:
        saved = read_checkpoint_eval(checkpoint_dir)
        state = (saved or {}).get("state")
        return cls(**state) if isinstance(state, dict) else None


def read_checkpoint_eval(checkpoint_dir: Path) -> dict[str, Any] | None:
    """A checkpoint's ``trinity_eval.json`` (``{step, eval_loss, state}``), or None (no evaluation)."""
    try:
        data = json.loads((Path(checkpoint_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class EvalCallback(TrainerCallback):
    """Evaluates at every ``every``-th step and the last, checkpoints there, and stops training after
    ``patience`` evaluations without a new best (0: never)."""

    def __init__(self, examples: list[Example], state: EvalState, emit: Emitter, *, every: int, total_steps: int,
                 patience: int, max_seconds: float):
        self.examples = examples
        self.state = state
        self.emit = emit
        self.every = every
        self.total = total_steps
        self.patience = patience
        self.max_seconds = max_seconds

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every and step < self.total:
            return
        self.evaluate(model, step)
        control.should_save = True  # the checkpoint of an evaluated step: the best one must exist
        if self.patience and self.state.since_best >= self.patience and step < self.total:
            s = self.state
            why = (f"no new lowest eval loss in {s.since_best} evaluations (train.early_stopping_patience = "
                   f"{self.patience}); best {s.best_eval_loss:.4f} at step {s.best_step}")
            s.early_stopped = {"step": step, "patience": self.patience, "best_step": s.best_step, "why": why}
            self.emit(f"early stopping at step {step}/{self.total}: {why}", **s.early_stopped)
            control.should_training_stop = True

    def evaluate(self, model: Any, step: int) -> None:
        first = self.state.rows is None
        examples = self.examples if first else self.examples[: self.state.rows]
        t0 = time.monotonic()
        scored = held_out_loss(model, examples, t0 + self.max_seconds if first else math.inf)
        seconds = time.monotonic() - t0
        if first:
            self.state.rows = scored["rows"]
        best = self.state.record(step, scored, seconds)
        s = self.state
        self.emit.eval(
            f"step {step}/{self.total} eval loss {scored['eval_loss']:.4f} ({scored['rows']} rows, "
            f"{scored['tokens']} tokens, {seconds:.1f} s)"
            + (" new best" if best else f"; best {s.best_eval_loss:.4f} at step {s.best_step}"),
            step=step, total_steps=self.total, eval_loss=round(scored["eval_loss"], 6), rows=scored["rows"],
            tokens=scored["tokens"], seconds=round(seconds, 2), stopped_on_time=scored["stopped_on_time"],
            best_step=s.best_step, best_eval_loss=s.best_eval_loss, evals_since_best=s.since_best)


def choose_checkpoint(spec: Any, state: EvalState | None, last_step: int, ckpt_root: Path) -> dict[str, Any]:
    """Which step is exported, and why: ``{step, checkpoint: best|last, eval_loss, why}``."""
    last = {"step": last_step, "checkpoint": "last", "eval_loss": state.loss_at(last_step) if state else None}
    if spec.export.checkpoint == "last":
        return {**last, "why": "export.checkpoint = last"}
    if not spec.train.eval_steps:
        return {**last, "why": "export.checkpoint = best, but evaluation during training is off "
                               "(train.eval_steps = 0): the last step is exported"}
    if state is None or state.best_step is None:
        return {**last, "why": "export.checkpoint = best, but there were no held-out rows to evaluate: "
                               "the last step is exported"}
    n = f"{len(state.history)} evaluation{'' if len(state.history) == 1 else 's'}"
    if state.best_step == last_step:
        return {**last, "checkpoint": "best", "why": f"the last step has the lowest eval loss of {n}"}
    if not (ckpt_root / f"step-{state.best_step}").is_dir():
        return {**last, "why": f"export.checkpoint = best, but the checkpoint of the best step {state.best_step} "
                               "is gone: the last step is exported"}
    return {"step": state.best_step, "checkpoint": "best", "eval_loss": state.best_eval_loss,
            "why": f"lowest eval loss of {n} ({state.best_eval_loss:.4f} at step {state.best_step}; "
                   + (f"last step {last_step}: {last['eval_loss']:.4f})" if last["eval_loss"] is not None
                      else f"last step {last_step} not evaluated)")}


def summary(state: EvalState | None, choice: dict[str, Any] | None) -> dict[str, Any]:
    """The fields run_job puts in result.json."""
    return {"eval_history": list(state.history) if state else [],
            "best_step": state.best_step if state else None,
            "checkpoint": choice or {},
            "early_stopping": state.early_stopped if state else None}
