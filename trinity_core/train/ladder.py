"""The OOM ladder: train on the spec's settings; when a CUDA OOM strikes, step down to cheaper ones.

Rungs (``spec.RUNGS``, in the seed's order) are cumulative: ``seq_2048`` keeps its cut when
``r_32`` is tried next. A rung that would change nothing (the spec already asks for seq 1024, say)
is dropped. :func:`walk` runs the attempts; it alone owns ``progress.json`` (the rung reached and
every attempt), so ``run_job`` on the same workdir resumes at that rung, and it reports the attempt
list in one event, ``type="ladder"``, each time the list changes (the worker copies it onto the
job's row; ``data``: ``attempts``, plus ``rung`` and ``settings`` when an attempt starts).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trinity_core import gpu
from trinity_core.artifacts import atomic_write_json, read_json
from trinity_core.errors import GpuMemoryNotReleased, OOMLadderExhausted
from trinity_core.events import Emitter
from trinity_core.options import RunOptions
from trinity_core.spec import RUNGS, JobSpec, RungSettings

PROGRESS_FILE = "progress.json"
LEFTOVER_LIMIT_GIB = 0.5
"""More than this still allocated after a failed attempt is released means the next rung would
start on a card the failed attempt still holds: the job must continue in a fresh process."""


@dataclass(frozen=True)
class Rung:
    name: str  # "recipe" for the spec as written, else the rung that was applied last
    settings: RungSettings


def rungs(spec: JobSpec) -> list[Rung]:
    """The rungs to try in order, starting with the spec itself; no-op rungs are dropped."""
    current = RungSettings.from_spec(spec)
    out = [Rung("recipe", current)]
    if not spec.ladder.enabled:
        return out
    for name in spec.ladder.rungs:
        nxt = RUNGS[name](current)
        if nxt != current:
            out.append(Rung(name, nxt))
            current = nxt
    return out


@dataclass
class Attempt:
    """One try at training: which rung, with what settings, how it ended."""

    rung: str
    settings: dict[str, Any]
    outcome: str = "running"  # running | ok | oom | skipped | failed | cancelled
    error: str | None = None
    seconds: float = 0.0
    estimate_gib: float | None = None
    steps_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """``progress.json``: the index of the rung reached and every attempt so far (across resumes)."""

    def __init__(self, workdir: Path, emit: Emitter):
        self.path, self.emit = workdir / PROGRESS_FILE, emit
        saved = read_json(self.path) or {}
        self.rung_index: int = saved.get("rung_index", 0)
        self.attempts = [Attempt(**a) for a in saved.get("attempts", [])]

    def as_list(self) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self.attempts]

    def save(self, rung_index: int, message: str | None = None, *, level: str = "info", **data: Any) -> None:
        """Write the file; with a message, report the attempt list as a ``ladder`` event."""
        self.rung_index = rung_index
        atomic_write_json(self.path, {"rung_index": rung_index, "attempts": self.as_list()})
        if message is not None:
            self.emit(message, level=level, type="ladder", attempts=self.as_list(), **data)


def walk(spec: JobSpec, backend: Any, train_dataset: Any, workdir: Path, emit: Emitter, options: RunOptions, *,
         tokenizer: Any = None, should_stop=None, on_step=None,
         eval_dataset: Any = None) -> tuple[Rung, Any, list[Attempt], Any]:
    """Try each rung until one trains: ``(rung, TrainOutcome, attempts, model)``; ``tokenizer``: the
    data stage's, handed to the backend so it is not loaded again; every rung evaluates on
    ``eval_dataset`` during training (``train/eval_loop.py``, rows cut to its own length). Raises
    ``OOMLadderExhausted`` when every rung ran out of memory, ``GpuMemoryNotReleased`` when a failed
    attempt kept its memory (the job continues at the next rung in a fresh process)."""
    from trinity_core.data.prepare import fit_to_length
    from trinity_core.train.trainer import train

    progress = Progress(workdir, emit)
    ladder = rungs(spec)
    start = min(progress.rung_index, len(ladder) - 1)

    for index in range(start, len(ladder)):
        rung = ladder[index]
        attempt = Attempt(rung=rung.name, settings=rung.settings.to_dict())
        progress.attempts.append(attempt)
        if spec.ladder.preflight and index < len(ladder) - 1 and skip_by_estimate(attempt, rung, spec, backend,
                                                                                  options):
            progress.save(index, f"rung '{rung.name}' skipped: estimated {attempt.estimate_gib:.1f} GiB, "
                          f"{attempt.extra['budget_gib']:.1f} GiB available", level="warning", skipped=rung.name)
            continue
        if index > 0 and index != start:
            progress.save(index, f"out of memory: stepping down to rung '{rung.name}'", level="warning",
                          rung=rung.name, settings=rung.settings.to_dict())
        else:
            progress.save(index, f"training on rung '{rung.name}'", rung=rung.name, settings=rung.settings.to_dict())
        t0 = time.monotonic()
        ran = rung.settings.apply(spec)
        try:
            model, trained_with = backend.load(ran, tokenizer)
            attempt.extra["adapter"] = adapter_shape(model)  # what was built, not what was asked for
            rows = fit_to_length(train_dataset, rung.settings.max_seq_length)
            outcome = train(model, trained_with, rows, ran, workdir, emit, should_stop=should_stop,
                            inject_oom=options.test_seams and len(progress.attempts) <= options.inject_oom,
                            on_step=on_step, eval_dataset=eval_dataset)
        except Exception as error:
            attempt.seconds = round(time.monotonic() - t0, 2)
            if not is_oom(error):
                attempt.outcome, attempt.error = "failed", f"{type(error).__name__}: {error}"
                progress.save(index, f"rung '{rung.name}' failed", level="warning")
                raise
            attempt.outcome, attempt.error = "oom", str(error).splitlines()[0][:300]
        else:
            attempt.outcome = "cancelled" if outcome.stopped else "ok"
            attempt.seconds = round(time.monotonic() - t0, 2)
            attempt.steps_done = outcome.global_step
            progress.save(index, f"rung '{rung.name}': {attempt.outcome} after {outcome.global_step} steps")
            return rung, outcome, progress.attempts, model
        # Free only here, past the except block: until it ends, the error's traceback holds the
        # failed attempt's frames (model, trainer, optimizer) and nothing could be released.
        model = trained_with = None  # noqa: F841
        gpu.release(report=options.debug_memory)
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # a cheaper rung has other shapes
        held = gpu.allocated_gib()
        if held > LEFTOVER_LIMIT_GIB and index + 1 < len(ladder):
            # Measured under Unsloth after genuine CUDA OOMs (docs/BENCHMARKS.md): every later rung
            # would OOM on the memory this attempt still holds. Resume at the next rung elsewhere.
            progress.save(index + 1)
            raise GpuMemoryNotReleased(
                f"out of memory on rung '{rung.name}', and {held:.1f} GiB stayed allocated after releasing it; "
                f"the job continues at rung '{ladder[index + 1].name}' in a fresh process",
                details={"leftover_gib": round(held, 2), "next_rung": ladder[index + 1].name,
                         "attempts": progress.as_list()})

    progress.save(len(ladder) - 1, "out of memory on every rung", level="warning")
    tried = ", ".join(f"{a.rung} ({a.outcome})" for a in progress.attempts)
    raise OOMLadderExhausted(f"out of memory on every rung of the ladder: {tried}", details=progress.as_list())


def skip_by_estimate(attempt: Attempt, rung: Rung, spec: JobSpec, backend: Any, options: RunOptions) -> bool:
    """Pre-flight: record the rung's memory estimate; mark it skipped when it cannot fit the GPU."""
    from trinity_core.train import memory

    checked = memory.preflight(rung.settings.apply(spec), backend.name, fast_dora=options.fast_dora,
                               lean_attention=options.lean_attention,
                               compiled_layers=(options.compiled_kernels and options.compiled_layers
                                                and options.unsloth_compile is not True))  # forced: Unsloth's instead
    if checked is None:  # no CUDA, or a config we cannot read: the OOM ladder alone decides
        return False
    estimate, budget = checked
    attempt.estimate_gib = round(estimate.gib, 2)
    attempt.extra["budget_gib"] = round(budget, 2)
    if estimate.fits(budget):
        return False
    attempt.outcome = "skipped"
    attempt.extra["estimate"] = estimate.to_dict()
    return True


def adapter_shape(model: Any) -> dict[str, Any]:
    """The LoRA layers the loaded model really carries: their ranks, whether DoRA magnitudes are
    there, and the projection names adapted (recorded per attempt, so a rung that did not reach the
    model shows)."""
    ranks, targets, dora = set(), set(), False
    for name, module in model.named_modules() if hasattr(model, "named_modules") else ():
        lora_a = getattr(module, "lora_A", None)
        if not hasattr(lora_a, "keys") or "default" not in lora_a.keys():
            continue
        ranks.add(lora_a["default"].out_features)
        targets.add(name.rsplit(".", 1)[-1])
        dora = dora or "default" in getattr(module, "lora_magnitude_vector", {})
    return {"r": sorted(ranks), "use_dora": dora, "target_modules": sorted(targets)}


def is_oom(error: BaseException) -> bool:
    """True for torch's OOM and for CUDA/cuBLAS allocation failures that surface as RuntimeError."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text or "out of memory" in text.lower()
    )
