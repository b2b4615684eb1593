"""Typed errors. Every error has a stable ``code`` the API returns as ``{"error": {"code", ...}}``.

Catch only what you mean: the OOM ladder catches ``torch.OutOfMemoryError`` and nothing wider.
"""

from __future__ import annotations

from typing import Any


class TrinityError(Exception):
    """Base class. ``code`` is stable; ``message`` is for humans; ``details`` is JSON-able."""

    code = "trinity_error"
    retryable = False

    def __init__(self, message: str, *, details: Any = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "param": self.param}
        if self.details is not None:
            out["details"] = self.details
        return out


class SpecError(TrinityError):
    """The job spec is invalid. ``details`` lists every problem: ``[{"loc": "lora.r", "msg": ...}]``."""

    code = "invalid_spec"


class DatasetError(TrinityError):
    """The dataset is unreadable or has invalid rows. ``details`` lists every problem found."""

    code = "invalid_dataset"


class TurnEndNotTrained(DatasetError):
    """An assistant turn's labels miss the turn terminator (``<end_of_turn>``): the fine-tune would never
    learn to stop. ``details`` lists the rows and turns; ``data.turn_end_check: warn`` lets it train."""

    code = "turn_end_not_trained"


class HubDownloadError(TrinityError):
    """A model or dataset could not be fetched from the hub. Transient: the worker may retry."""

    code = "hub_download_failed"
    retryable = True


class ModelUnavailable(TrinityError):
    """The model's config cannot be found: a missing local directory, one without config.json, or a
    hub id that is neither shipped, in the local Hugging Face cache, nor reachable on the hub.
    ``details["reason"]`` says which; the message says what to do. Not retried: it will not fix itself."""

    code = "model_unavailable"


class BackendUnavailable(TrinityError):
    """The requested training backend cannot run here (e.g. unsloth without CUDA)."""

    code = "backend_unavailable"


class OOMLadderExhausted(TrinityError):
    """Every rung of the OOM ladder ran out of memory. ``details`` holds the attempts."""

    code = "oom_ladder_exhausted"


class GpuMemoryNotReleased(TrinityError):
    """A failed attempt's GPU memory stayed allocated after it was released (a library kept a
    reference). Progress already points at the next rung: re-run the job in a fresh process (the
    worker re-queues it; ``worker_max_tasks_per_child=1`` gives it one) and it resumes there."""

    code = "gpu_memory_not_released"
    retryable = True


class TrainingError(TrinityError):
    """Training failed for a reason other than memory (NaN loss, data/model mismatch...)."""

    code = "training_failed"


class JobCancelled(TrinityError):
    """The job's stop flag was raised; training stopped at a step boundary."""

    code = "cancelled"


class ExportError(TrinityError):
    """Merging, GGUF conversion or quantisation failed."""

    code = "export_failed"


class ArtifactError(TrinityError):
    """An artifact could not be written (disk full, permission...)."""

    code = "artifact_write_failed"


class AdapterPlacementError(TrainingError):
    """An adapter landed outside the language model (vision tower or multimodal projector of a
    Gemma3ForConditionalGeneration). A text-only job must leave those exactly as published."""

    code = "adapter_placement"


class ExportResourcesError(TrinityError):
    """The job's checkpoints and export cannot fit this host: ``code`` is ``insufficient_disk`` or
    ``insufficient_memory``. Raised by the pre-flight (``resources.check``) before training; the
    message names what is needed, what is free, where, and which spec switch lowers it."""

    code = "insufficient_disk"

    def __init__(self, message: str, *, code: str = "insufficient_disk", **kw: Any):
        super().__init__(message, **kw)
        self.code = code
