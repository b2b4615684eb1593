"""Training: TRL's SFTTrainer given a finished model and dataset, plus Trinity's callbacks.

- ``ProgressCallback`` turns Trainer logs into ``metrics`` events (loss, lr, grad_norm,
  tokens/s, peak memory, ETA), honours the cooperative stop flag at step boundaries and hosts
  the injected-OOM test seam (``RunOptions.inject_oom``, passed down by the ladder).
- ``CheckpointCallback`` makes checkpoints atomic: the Trainer writes ``checkpoints/.staging/
  checkpoint-N``; once complete it is renamed to ``checkpoints/step-N``. Only ``step-*`` dirs
  count, so a kill mid-save never leaves a checkpoint that looks complete. It writes the evaluation
  state (:mod:`trinity_core.train.eval_loop`) into each checkpoint before the rename, and its pruning of old
  checkpoints spares the best one when that is the one to export.
- ``OptimizerStepCallback``: bitsandbytes' 8-bit step without a device sync after each parameter (``bnb_step``).
- ``EvalCallback`` (``eval_loop``): the held-out loss every ``train.eval_steps``, early stopping; at the
  end the best step's adapter is loaded back when ``export.checkpoint`` is ``best``.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from trinity_core import gpu
from trinity_core.train import bnb_step, eval_loop
from trinity_core.events import Emitter
from trinity_core.spec import JobSpec

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainOutcome:
    stopped: bool  # True when the stop flag ended training early
    global_step: int
    resumed_from: int | None
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    peak_mem_gib: float = 0.0
    tokens_per_s: float | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval_loop.summary: eval_history, best_step...


def checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = checkpoints(ckpt_root)
    return found[-1][1] if found else None


def peak_memory_gib() -> float:
    """Training's peak: GPU memory allocated with CUDA, else the process's peak RSS."""
    if gpu.available():
        return gpu.peak_gib()
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class CheckpointCallback(TrainerCallback):
    def __init__(self, ckpt_root: Path, keep: int, evaluation: eval_loop.EvalState | None = None,
                 keep_best: bool = False):
        self.root = ckpt_root
        self.staging = ckpt_root / ".staging"
        self.keep = keep
        self.evaluation = evaluation
        self.keep_best = keep_best

    def on_save(self, args, state, control, **kwargs):
        src = self.staging / f"checkpoint-{state.global_step}"
        if not src.is_dir():
            return
        if self.evaluation is not None:
            self.evaluation.write(src, state.global_step)
        dst = self.root / f"step-{state.global_step}"
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)
        best = self.evaluation.best_step if self.evaluation is not None and self.keep_best else None
        for step, old in checkpoints(self.root)[: -self.keep]:
            if step != best:
                shutil.rmtree(old, ignore_errors=True)


class ProgressCallback(TrainerCallback):
    def __init__(self, emit: Emitter, total_steps: int, should_stop: Callable[[], bool] | None,
                 inject_oom: bool, on_step: Callable[[int], None] | None = None):
        self.emit = emit
        self.total = total_steps
        self.should_stop = should_stop
        self.inject_oom = inject_oom
        self.on_step = on_step
        self.start_time = time.monotonic()
        self.start_step = 0
        self.last_tokens: tuple[float, int] | None = None
        self.tokens_per_s: float | None = None
        self.stopped = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.monotonic()
        self.start_step = state.global_step
        self.last_tokens = (self.start_time, state.num_input_tokens_seen)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.inject_oom:
            import torch

            raise torch.OutOfMemoryError(
                "CUDA out of memory (injected by RunOptions.inject_oom at the first step of this attempt)"
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.on_step is not None:
            self.on_step(state.global_step)
        if self.should_stop is not None and self.should_stop():
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        if self.last_tokens and now > self.last_tokens[0] and tokens > self.last_tokens[1]:
            self.tokens_per_s = (tokens - self.last_tokens[1]) / (now - self.last_tokens[0])
        self.last_tokens = (now, tokens)
        done = state.global_step - self.start_step
        elapsed = now - self.start_time
        eta = elapsed / done * (self.total - state.global_step) if done > 0 else None
        self.emit.metrics(
            f"step {state.global_step}/{self.total} loss {logs['loss']:.4f}",
            step=state.global_step,
            total_steps=self.total,
            loss=float(logs["loss"]),
            lr=float(logs.get("learning_rate", 0.0)),
            grad_norm=_float_or_none(logs.get("grad_norm")),
            tokens_per_s=round(self.tokens_per_s, 1) if self.tokens_per_s else None,
            elapsed_s=round(elapsed, 2),
            eta_s=round(eta, 1) if eta is not None else None,
            peak_mem_gib=round(peak_memory_gib(), 3),
        )


class OptimizerStepCallback(TrainerCallback):
    """A lighter 8-bit optimizer step: bitsandbytes' per-parameter ``torch.cuda.synchronize()`` skipped
    (:mod:`trinity_core.train.bnb_step`; the Trainer has made the optimizer by ``on_train_begin``)."""

    def __init__(self):
        self.applied = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if bnb_step.ENABLED and inner is not None:
            bnb_step.without_per_parameter_sync(inner)
            self.applied = bnb_step.chosen(inner)  # also when an earlier attempt chose it


def _float_or_none(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def sft_config(spec: JobSpec, output_dir: Path) -> Any:
    """The one place TRL's config is built. ``spec`` already carries the ladder's settings."""
    from trl import SFTConfig

    on_gpu = gpu.available()
    dtype_name = str(gpu.compute_dtype(spec.model.compute_dtype)).removeprefix("torch.")  # the backends' choice
    t = spec.train
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        optim=t.optim,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        max_steps=t.max_steps,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,  # in .staging only; CheckpointCallback keeps the newest N step dirs
        max_length=spec.model.max_seq_length,
        packing=t.packing,
        bf16=on_gpu and dtype_name == "bfloat16",
        fp16=on_gpu and dtype_name == "float16",
        gradient_checkpointing=False,  # the backend has already set it on the model
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        dataloader_pin_memory=on_gpu,
        disable_tqdm=True,
        eval_strategy="no",
        use_cpu=not on_gpu,
    )


def train(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    spec: JobSpec,
    workdir: Path,
    emit: Emitter,
    *,
    should_stop: Callable[[], bool] | None = None,
    inject_oom: bool = False,
    on_step: Callable[[int], None] | None = None,
    eval_dataset: Any = None,
) -> TrainOutcome:
    """Train (or resume from the newest complete checkpoint) and save ``workdir/adapter``: the last
    step's, or the best evaluated step's (``export.checkpoint``). ``eval_dataset``: the tokenised
    held-out rows scored every ``train.eval_steps`` (none: no evaluation during training)."""
    from trl import SFTTrainer

    ckpt_root = workdir / "checkpoints"
    staging = ckpt_root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(ckpt_root)
    progress = ProgressCallback(emit, spec.train.max_steps, should_stop, inject_oom, on_step)
    t = spec.train
    examples = [] if not t.eval_steps else eval_loop.eval_examples(
        eval_dataset, max_rows=t.eval_max_rows, max_tokens=min(t.eval_max_tokens, spec.model.max_seq_length))
    evaluation = ((resume and eval_loop.EvalState.load(resume)) or eval_loop.EvalState()) if examples else None
    callbacks = [progress, CheckpointCallback(ckpt_root, t.save_total_limit, evaluation,
                                              keep_best=spec.export.checkpoint == "best"), OptimizerStepCallback()]
    if evaluation is not None:
        callbacks.append(eval_loop.EvalCallback(examples, evaluation, emit, every=t.eval_steps, total_steps=t.max_steps,
                                                patience=t.early_stopping_patience, max_seconds=t.eval_max_seconds))
    elif t.eval_steps:
        emit.warning("no held-out rows to evaluate during training (data.eval_fraction / data.eval_path)")
    trainer = SFTTrainer(
        model=model,
        args=sft_config(spec, staging),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our events replace its raw log dicts on stdout
    resumed_from = int(STEP_DIR.match(resume.name).group(1)) if resume else None
    if resume:
        emit(f"resuming from checkpoint step {resumed_from}", resumed_from=resumed_from)
    started = time.monotonic()
    if resume and (resumed_from >= spec.train.max_steps or (evaluation and evaluation.early_stopped)):
        # Killed after the last checkpoint (during export, say): training is over, and the Trainer
        # resumed at max_steps would run one step more (or, after early stopping, train on).
        # Take that checkpoint's adapter and history.
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - started

    choice = None
    if not progress.stopped:  # a cancelled run is resumed later, from its newest checkpoint
        choice = eval_loop.choose_checkpoint(spec, evaluation, trainer.state.global_step, ckpt_root)
        if choice["step"] != trainer.state.global_step:
            trainer._load_from_checkpoint(str(ckpt_root / f"step-{choice['step']}"))
        emit(f"exporting step {choice['step']} ({choice['checkpoint']}): {choice['why']}", **choice)
    save_adapter(trainer, workdir / "adapter")
    history = [
        {"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return TrainOutcome(
        stopped=progress.stopped,
        global_step=trainer.state.global_step,
        resumed_from=resumed_from,
        loss_history=history,
        seconds=seconds,
        peak_mem_gib=peak_memory_gib(),
        tokens_per_s=progress.tokens_per_s,
        evaluation=eval_loop.summary(evaluation, choice),
    )


def save_adapter(trainer: Any, out_dir: Path) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors), written then renamed."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
