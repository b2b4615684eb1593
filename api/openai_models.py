"""The shapes of the OpenAI-compatible surface (``/v1``), one family per resource: files, fine-tuning
jobs, their events and checkpoints. Field names and types follow OpenAI's API reference, so the
official ``openai`` package parses them; the table behind them is Trinity's own (``trinity_service.models``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator

Auto = Literal["auto"]


def _auto_or(kind: type, low: float, high: float, *, low_open: bool = False) -> Any:
    """``"auto"`` or a number of ``kind`` in range, with one clear message (not pydantic's union errors)."""
    bound = f"{'above' if low_open else 'from'} {low:g} {'up ' if low_open else ''}to {high:g}"

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
        if not ok or not ((low < value) if low_open else (low <= value)) or value > high:
            raise ValueError(f"must be 'auto' or {'a number' if kind is float else 'an integer'} {bound}")
        return kind(value)

    return Annotated[Auto | kind, PlainValidator(check, json_schema_input_type=Auto | kind)]


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters, mapped onto the Trinity spec (docs/API.md)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: _auto_or(int, 1, 100) = Field(
        "auto", description="Passes over the training file: train.max_steps = ceil(n_epochs × training rows / "
        "batch_size). auto: the spec's train.max_steps.")
    batch_size: _auto_or(int, 1, 1024) = Field(
        "auto", description="Rows per optimizer step: train.batch_size × train.grad_accum (the micro-batch stays "
        "the spec's when it divides batch_size, else 1). auto: the spec's.")
    learning_rate_multiplier: _auto_or(float, 0, 100, low_open=True) = Field(
        "auto", description="train.learning_rate = multiplier × the spec's learning rate (2e-4 by default).")


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        "supervised", description="Only supervised fine-tuning is available.")
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobCreate(BaseModel):
    """``client.fine_tuning.jobs.create(...)``. Trinity's own settings ride along as a spec in
    ``extra_body={"trinity_spec": {...}}`` or as JSON text in ``metadata["trinity_spec"]``; the
    OpenAI fields override the spec's (model, training_file, suffix, seed, hyperparameters)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="The base model: a hub id or a directory in TRINITY_MODEL_DIRS.")
    training_file: str = Field(min_length=1, description="Id of a file uploaded with purpose fine-tune.")
    validation_file: str | None = Field(None, description="Id of a file uploaded with purpose fine-tune: the eval "
                                        "rows (data.eval_dataset_id); without it Trinity holds out "
                                        "data.eval_fraction of the training file.")
    suffix: str | None = Field(None, max_length=64, description="Part of fine_tuned_model; stored as the spec's name.")
    seed: int | None = Field(None, description="train.seed")
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI in favour of method.")
    method: Method | None = None
    metadata: dict[str, str] | None = Field(None, description="Up to 16 pairs; keys ≤ 64, values ≤ 512 characters "
                                                               "(trinity_spec may be longer).")
    integrations: list[dict[str, Any]] | None = Field(None, description="Not supported (must be empty).")
    trinity_spec: dict[str, Any] | None = Field(None, description="A Trinity job spec (extra_body).")
    queue: str | None = Field(None, description="Trinity GPU queue (extra_body); default: the smallest "
                                 "GPU class the job's memory estimate fits (TRINITY_QUEUE_GPU_GIB), else the first.")

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 pairs")
        for key, text in value.items():
            if len(key) > 64 or (len(text) > 512 and key != "trinity_spec"):
                raise ValueError(f"{key!r}: keys are at most 64 characters, values at most 512")
        return value

    def requested_hyperparameters(self) -> Hyperparameters:
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


# ── responses ────────────────────────────────────────────────────────────────────────────────

class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"]
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = Field(None, description="Why the file is unusable (status error)")
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None = Field(description="Set when the job succeeded: ft:<model>:<tenant>:<suffix>:<id>")
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str = Field(description="The tenant")
    result_files: list[str] = Field(description="When succeeded: the step metrics CSV (GET /v1/files/{id}/content)")
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="Trinity's cancelling shows as running until the worker stops")
    trained_tokens: int | None = Field(description="When succeeded: tokens/s × training seconds (an estimate)")
    training_file: str | None
    validation_file: str | None = None
    estimated_finish: int | None = Field(description="While running: unix time the job should finish")
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventObject] = Field(description="Newest first")
    has_more: bool


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float | None]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject] = Field(description="Newest first")
    has_more: bool
    first_id: str | None
    last_id: str | None
