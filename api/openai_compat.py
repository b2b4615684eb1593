"""Translation between OpenAI's fine-tuning objects and Trinity's: a create request becomes a job
spec (then the same checks and ``api.submit`` as ``POST /jobs``); a job row, its events and its
checkpoints become OpenAI's objects. No job logic lives here."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from api.errors import ApiError
from trinity_service.models import CheckpointPublic, Dataset, Job, JobEvent, JobOpenAI
from api.openai_models import (
    CheckpointObject,
    FileObject,
    FineTuningJob,
    FineTuningJobCreate,
    JobEventObject,
)
from trinity_service.states import JobStatus
from trinity_core.spec import DataSpec, TrainSpec

S = JobStatus
STATUS = {S.validating_files: "validating_files", S.queued: "queued", S.running: "running",
          S.cancelling: "running", S.succeeded: "succeeded", S.failed: "failed", S.cancelled: "cancelled"}
LEVEL = {"info": "info", "warning": "warn", "error": "error"}
# spec fields an OpenAI request sets, reported under the request's own names
PARAM = {"data.dataset_id": "training_file", "data.eval_dataset_id": "validation_file", "model.name_or_path": "model",
         "train.seed": "seed", "name": "suffix"}
RESULTS_PREFIX = "file-results-"
RESULTS_CSV = ("step", "train_loss", "learning_rate", "grad_norm", "tokens_per_s")
DEFAULT_LR = TrainSpec.model_fields["learning_rate"].default


# ── request → spec ───────────────────────────────────────────────────────────────────────────

def base_spec(req: FineTuningJobCreate) -> dict[str, Any]:
    """The Trinity spec riding along: ``trinity_spec`` (extra_body) or ``metadata["trinity_spec"]`` (JSON)."""
    if req.trinity_spec is not None:
        return copy.deepcopy(req.trinity_spec)
    text = (req.metadata or {}).get("trinity_spec")
    if text is None:
        return {}
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise ApiError(400, "invalid_request", f"metadata.trinity_spec is not JSON: {error}",
                       param="metadata.trinity_spec") from None
    if not isinstance(spec, dict):
        raise ApiError(400, "invalid_request", "metadata.trinity_spec must be a JSON object",
                       param="metadata.trinity_spec")
    return spec


def unsupported(req: FineTuningJobCreate) -> ApiError | None:
    if req.method is not None and req.method.type != "supervised":
        return ApiError(400, "unsupported_method", f"method.type {req.method.type!r}: only supervised fine-tuning "
                        "is available", param="method.type")
    if req.integrations:
        return ApiError(400, "unsupported_parameter", "integrations are not supported", param="integrations")
    return None


def to_spec(req: FineTuningJobCreate, dataset: Dataset | None) -> dict[str, Any]:
    """The raw spec body the request means (checked afterwards exactly like a ``POST /jobs`` body).
    ``dataset`` (the training file, when it exists) gives the row count that ``n_epochs`` needs."""
    body = base_spec(req)
    part = {name: dict(body[name]) if isinstance(body.get(name), dict) else {} for name in ("model", "data", "train")}
    part["model"]["name_or_path"] = req.model
    part["data"].pop("path", None)
    part["data"].pop("hub", None)
    part["data"]["dataset_id"] = req.training_file
    part["data"].pop("eval_path", None)
    if req.validation_file:  # the eval rows: no held-out split (DataSpec refuses one asked for beside it)
        part["data"]["eval_dataset_id"] = req.validation_file
    train = part["train"]
    if req.seed is not None:
        train["seed"] = req.seed
    hp = req.requested_hyperparameters()
    if hp.batch_size != "auto":
        micro = train.get("batch_size", TrainSpec.model_fields["batch_size"].default)
        micro = micro if isinstance(micro, int) and micro > 0 and hp.batch_size % micro == 0 else 1
        train["batch_size"], train["grad_accum"] = micro, hp.batch_size // micro
    if hp.learning_rate_multiplier != "auto":
        lr = train.get("learning_rate", DEFAULT_LR)
        train["learning_rate"] = hp.learning_rate_multiplier * (lr if isinstance(lr, (int, float)) else DEFAULT_LR)
    if hp.n_epochs != "auto" and dataset is not None and (steps := _epoch_steps(hp.n_epochs, dataset, part)):
        train["max_steps"] = steps
    body.update(part)
    if req.suffix is not None:
        body["name"] = req.suffix
    return body


def _epoch_steps(n_epochs: int, dataset: Dataset, part: dict[str, dict[str, Any]]) -> int | None:
    """ceil(n_epochs × training rows / rows per step); the training rows as ``data.split_indices`` holds
    out the eval rows (none are held out with a validation file). None when the spec's own values are invalid (the spec check reports them)."""
    from trinity_core.data.prepare import split_indices

    data, train = part["data"], part["train"]
    try:
        rows = int((dataset.report.get("stats") or {}).get("valid_rows") or dataset.rows or 0)
        held = split_indices(rows, fraction=float(data.get("eval_fraction", DataSpec.model_fields["eval_fraction"].default)),
                             min_rows=int(data.get("eval_min_rows", DataSpec.model_fields["eval_min_rows"].default)),
                             seed=0)[1] if rows and not data.get("eval_dataset_id") else []
        per_step = int(train.get("batch_size", 1)) * int(train.get("grad_accum", TrainSpec.model_fields["grad_accum"].default))
    except (TypeError, ValueError):
        return None
    if rows == 0 or per_step < 1:
        return None
    return max(1, math.ceil(n_epochs * (rows - len(held)) / per_step))


def resolved_hyperparameters(req: FineTuningJobCreate, spec: dict[str, Any]) -> dict[str, Any]:
    """What the job will use, in OpenAI's terms: ``n_epochs`` as asked (auto: train.max_steps decides),
    the rows per step, and the multiplier as asked (auto: the spec's rate over the default 2e-4)."""
    train, asked = spec.get("train") or {}, req.requested_hyperparameters()
    multiplier = asked.learning_rate_multiplier
    return {"n_epochs": asked.n_epochs, "batch_size": train["batch_size"] * train["grad_accum"],
            "learning_rate_multiplier": round(train["learning_rate"] / DEFAULT_LR, 6) if multiplier == "auto"
            else multiplier}


def request_param(loc: str) -> str:
    """A spec location under the name the OpenAI request used for it."""
    return PARAM.get(loc, loc)


def rename_params(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**p, "loc": request_param(p["loc"])} for p in problems]


# ── objects out ──────────────────────────────────────────────────────────────────────────────

def file_object(dataset: Dataset) -> FileObject:
    return FileObject(id=dataset.id, bytes=dataset.size_bytes, created_at=int(dataset.created_at),
                      filename=dataset.filename, purpose="fine-tune", status="processed" if dataset.ok else "error",
                      status_details=None if dataset.ok else (dataset.report or {}).get("summary"))


def results_file_id(job: Job) -> str:
    return RESULTS_PREFIX + job.id


def results_csv(events: list[JobEvent]) -> str:
    """The step metrics of a job as OpenAI's results file: one CSV row per logged step."""
    lines = [",".join(RESULTS_CSV)]
    for e in events:
        d = e.data or {}
        values = (d.get("step"), d.get("loss"), d.get("lr"), d.get("grad_norm"), d.get("tokens_per_s"))
        lines.append(",".join("" if v is None else str(v) for v in values))
    return "\n".join(lines) + "\n"


def model_name(job: Job) -> str:
    """OpenAI's ``ft:<base model>:<organisation>:<suffix>:<job id>``, the tenant as organisation."""
    model = Path(str((job.spec.get("model") or {}).get("name_or_path", ""))).name
    return f"ft:{model}:{job.tenant}:{job.spec.get('name') or ''}:{job.id}"


def fine_tuned_model(job: Job) -> str | None:
    return model_name(job) if job.status == S.succeeded else None


def job_object(job: Job, extra: JobOpenAI | None) -> FineTuningJob:
    spec, result = job.spec, job.result or {}
    train = spec.get("train") or {}
    hp = dict(extra.hyperparameters) if extra else {
        "n_epochs": "auto", "batch_size": train.get("batch_size", 1) * train.get("grad_accum", 1),
        "learning_rate_multiplier": round(train.get("learning_rate", DEFAULT_LR) / DEFAULT_LR, 6)}
    succeeded = job.status == S.succeeded
    tokens = None
    if succeeded and result.get("tokens_per_s") and result.get("train_seconds"):
        tokens = int(result["tokens_per_s"] * result["train_seconds"])
    estimated = None
    if job.status in (S.running, S.cancelling) and job.eta_s is not None:
        estimated = int((job.heartbeat_at or job.started_at or job.created_at) + job.eta_s)
    error = None
    if job.status == S.failed and job.error:
        error = {"code": job.error.get("code") or "internal_error", "message": job.error.get("message") or "",
                 "param": request_param(job.error["param"]) if job.error.get("param") else None}
    return FineTuningJob(
        id=job.id, created_at=int(job.created_at), error=error, fine_tuned_model=fine_tuned_model(job),
        finished_at=int(job.finished_at) if job.finished_at else None, hyperparameters=hp,
        model=str((spec.get("model") or {}).get("name_or_path", "")), organization_id=job.tenant,
        result_files=[results_file_id(job)] if succeeded else [], seed=int(train.get("seed", 0)),
        status=STATUS[job.status], trained_tokens=tokens, training_file=job.dataset_id,
        validation_file=(spec.get("data") or {}).get("eval_dataset_id"),
        estimated_finish=estimated, metadata=(extra.labels or None) if extra else None,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        user_provided_suffix=spec.get("name"))


def event_id(job_id: str, seq: int) -> str:
    return f"ftevent-{job_id.removeprefix('ftjob-')}-{seq}"


def cursor_seq(cursor: str | None, prefix: str) -> int | None:
    """The number at the end of an event or checkpoint id (``ftevent-<job>-17`` → 17)."""
    if not cursor:
        return None
    tail = cursor.rsplit("-", 1)[-1]
    if not cursor.startswith(prefix) or not tail.isdigit():
        raise ApiError(400, "invalid_request", f"after: not an id from this list ({cursor!r})", param="after")
    return int(tail)


def event_object(job_id: str, event: JobEvent) -> JobEventObject:
    data = dict(event.data or {})
    if event.type == "metrics" and "loss" in data:
        data["train_loss"] = data["loss"]
    if event.type == "eval" and "eval_loss" in data:  # the held-out loss during training: OpenAI's valid_loss
        data["valid_loss"] = data["eval_loss"]  # (a message: OpenAI's metrics events are the training steps)
    return JobEventObject(id=event_id(job_id, event.seq), created_at=int(event.time), level=LEVEL.get(event.level, "info"),
                          message=event.message, type="metrics" if event.type == "metrics" else "message", data=data)


def checkpoint_object(job: Job, checkpoint: CheckpointPublic, losses: dict[int, float]) -> CheckpointObject:
    base = model_name(job)
    return CheckpointObject(
        id=f"ftckpt-{job.id.removeprefix('ftjob-')}-{checkpoint.step}", created_at=int(checkpoint.created_at),
        fine_tuned_model_checkpoint=f"{base}:ckpt-step-{checkpoint.step}", fine_tuning_job_id=job.id,
        metrics={"step": float(checkpoint.step), "train_loss": losses.get(checkpoint.step),
                 "valid_loss": checkpoint.eval_loss},
        step_number=checkpoint.step)

