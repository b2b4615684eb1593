"""Database tables and the API's public shapes, one family per resource.

Tables (``table=True``) never leave the service: routes return the ``*Public`` models, which
leave out server-side paths, key hashes and fencing tokens. Times are unix seconds (floats).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlalchemy import Enum as SAEnum
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from trinity_service.states import JobStatus
from trinity_core.spec import JobSpec


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> float:
    return time.time()


class ErrorInfo(BaseModel):
    """The one error shape (``api/errors.py``), also stored on a failed job's row."""

    code: str
    message: str
    param: str | None = None
    type: str | None = PydanticField(None, description="invalid_request_error (4xx) or server_error (5xx), as OpenAI's")
    details: Any = None


# ── API keys ─────────────────────────────────────────────────────────────────────────────────

class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(index=True, max_length=200)
    key_hash: str = Field(unique=True, max_length=64, description="sha256 hex of the key; the key is never stored")
    prefix: str = Field(max_length=16, description="First characters of the key, to tell keys apart")
    created_at: float = Field(default_factory=now)
    revoked_at: float | None = None


class ApiKeyPublic(SQLModel):
    id: int
    tenant: str
    prefix: str
    created_at: float
    revoked_at: float | None


# ── Datasets ─────────────────────────────────────────────────────────────────────────────────

class Dataset(SQLModel, table=True):
    __tablename__ = "dataset"

    id: str = Field(default_factory=lambda: new_id("ds"), primary_key=True, max_length=40)
    tenant: str = Field(index=True, max_length=200)
    filename: str = Field(max_length=255, description="The uploaded name, for display only")
    path: str = Field(description="Where the file is stored (server side; never returned)")
    format: str | None = Field(default=None, max_length=40)
    size_bytes: int
    sha256: str = Field(max_length=64)
    ok: bool
    rows: int | None = None
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: float = Field(default_factory=now)


class DatasetPublic(SQLModel):
    id: str
    object: str = "dataset"
    filename: str
    format: str | None
    size_bytes: int
    sha256: str
    status: str = Field(description="valid | invalid (see errors); a job refuses an invalid dataset")
    rows: int | None
    stats: dict[str, Any]
    mapping: dict[str, Any] | None
    errors: list[dict[str, Any]] = Field(description="Every problem found, each with its row number")
    warnings: list[Any]
    created_at: float

    @classmethod
    def of(cls, ds: Dataset) -> DatasetPublic:
        report = ds.report or {}
        return cls(
            id=ds.id, filename=ds.filename, format=ds.format, size_bytes=ds.size_bytes, sha256=ds.sha256,
            status="valid" if ds.ok else "invalid", rows=ds.rows, stats=report.get("stats") or {},
            mapping=report.get("mapping"), errors=report.get("errors") or [],
            warnings=report.get("warnings") or [], created_at=ds.created_at,
        )


# ── Jobs ─────────────────────────────────────────────────────────────────────────────────────

class JobCreate(JobSpec):
    """The body of ``POST /jobs``: a job spec (``trinity_core.spec.JobSpec``), every field with its
    default (the seed recipe). The dataset is ``data.dataset_id`` (``POST /datasets``) or
    ``data.hub``; the service refuses ``data.path`` (it reads no server paths)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"name_or_path": "unsloth/gemma-3-12b-it-bnb-4bit", "max_seq_length": 4096},
        "lora": {"r": 64, "alpha": 32}, "train": {"max_steps": 60}, "data": {"dataset_id": "ds-1f0c..."}}]})


class Job(SQLModel, table=True):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_job_tenant_idempotency_key"),
        Index("ix_job_queue_status", "queue", "status", "queued_at"),
    )

    id: str = Field(default_factory=lambda: new_id("ftjob"), primary_key=True, max_length=40)
    tenant: str = Field(index=True, max_length=200)
    status: JobStatus = Field(default=JobStatus.validating_files, sa_column=Column(
        SAEnum(JobStatus, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]),
        index=True, nullable=False))
    queue: str = Field(max_length=100)
    routing: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON),
                                           description="Why the job went to its queue (api/routing.py)")
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    dataset_id: str | None = Field(default=None, max_length=40)
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)

    created_at: float = Field(default_factory=now, index=True)
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    enqueued_at: float | None = Field(default=None, description="Last time a message was sent for it")
    task_id: str | None = Field(default=None, max_length=80, description="Celery id of the last message sent")

    cancel_requested: bool = False
    run_token: int = Field(default=0, description="Bumped by each claim: fences writes from a worker that lost the job")
    resumes: int = Field(default=0, description="Times the job was re-queued after its worker died")
    worker: str | None = Field(default=None, max_length=255)

    stage: str | None = Field(default=None, max_length=40)
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    peak_mem_gib: float | None = None
    rung: str | None = Field(default=None, max_length=40)
    settings: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    attempts: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    last_seq: int = Field(default=0, description="Highest event seq written for this job")


class JobPublic(SQLModel):
    id: str
    object: str = "fine_tuning.job"
    status: JobStatus
    queue: str
    queue_position: int | None = Field(None, description="1 = next to start (queued jobs only)")
    routing: dict[str, Any] | None = Field(None, description="Why the job went to its queue: rule (recipe_fits, "
                                           "cheapest_rung_fits, explicit, default), reason, and the memory "
                                           "estimate per queue it compared")
    spec: dict[str, Any] = Field(description="The validated spec, every default filled in when it was submitted")
    dataset_id: str | None
    stage: str | None
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    peak_mem_gib: float | None
    rung: str | None = Field(description="OOM-ladder rung running (recipe = the spec as written)")
    settings: dict[str, Any] | None = Field(description="Settings actually running, after OOM downgrades")
    attempts: list[dict[str, Any]]
    resumes: int
    cancel_requested: bool
    error: ErrorInfo | None  # the API's one error shape
    result: dict[str, Any] | None = Field(description="Summary of the finished run (loss history in events)")
    created_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None

    @classmethod
    def of(cls, job: Job, *, queue_position: int | None = None) -> JobPublic:
        return cls.of_row(job.model_dump(), queue_position=queue_position)

    @classmethod
    def of_row(cls, row: dict[str, Any], *, queue_position: int | None = None) -> JobPublic:
        """From the job table's columns by name (``crud.job_row``: the hot poll builds no ORM object)."""
        return cls.model_validate(row | {"queue_position": queue_position,
                                         "result": _summary(row["result"], row["dataset_id"], row["spec"])})


def _summary(result: dict[str, Any] | None, dataset_id: str | None, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The run's result without the loss history (it is in the metrics events) or server paths."""
    if not result:
        return None
    result = {k: v for k, v in result.items() if k not in ("loss_history", "workdir")}
    data = (result.get("resolved_spec") or {}).get("data")
    if isinstance(data, dict) and dataset_id:
        data = {**data, "path": None, "dataset_id": dataset_id}
        if data.get("eval_path"):
            data = {**data, "eval_path": None, "eval_dataset_id": (spec.get("data") or {}).get("eval_dataset_id")}
        result["resolved_spec"] = {**result["resolved_spec"], "data": data}
    return result


class JobList(SQLModel):
    object: str = "list"
    data: list[JobPublic]
    has_more: bool


class JobOpenAI(SQLModel, table=True):
    """What an OpenAI client sent with a job that the Trinity spec has no place for."""

    __tablename__ = "job_openai"

    job_id: str = Field(foreign_key="job.id", primary_key=True, max_length=40)
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


# ── Events ───────────────────────────────────────────────────────────────────────────────────

class JobEvent(SQLModel, table=True):
    __tablename__ = "job_event"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_event_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id", index=True, max_length=40)
    seq: int = Field(description="Monotonic per job, assigned by the service (not by run_job)")
    time: float = Field(default_factory=now)
    level: str = Field(max_length=10)
    type: str = Field(max_length=10)
    message: str
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class EventPublic(SQLModel):
    seq: int
    time: float
    level: str
    type: str
    message: str
    data: dict[str, Any]


class EventList(SQLModel):
    object: str = "list"
    data: list[EventPublic]
    has_more: bool
    last_seq: int | None = Field(description="Pass as `after` to get the next page")


# ── Files ────────────────────────────────────────────────────────────────────────────────────

class CheckpointPublic(SQLModel):
    step: int
    created_at: float
    size_bytes: int
    eval_loss: float | None = Field(None, description="Held-out loss at this step (evaluation during training); "
                                    "null when the step was not evaluated")
    best: bool = Field(False, description="The evaluated step with the lowest eval loss so far "
                       "(exported with export.checkpoint = best)")


class ArtifactPublic(SQLModel):
    name: str
    kind: str | None
    size: int | None
    sha256: str | None


class DatasetList(SQLModel):
    object: str = "list"
    data: list[DatasetPublic]
    has_more: bool
