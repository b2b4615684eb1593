"""Runs one claimed job: ``trinity_core.run_job`` with callbacks that keep the row true.

- ``on_event`` stores each core event with the service's own per-job ``seq`` (run_job's restarts
  on resume) and copies progress onto the row: step, loss, tokens/s, ETA, memory, stage, and the
  OOM ladder's rung and settings when a downgrade warning arrives.
- ``on_step`` and a heartbeat thread touch ``heartbeat_at`` (the thread also covers data
  preparation, model loading and export, where there are no steps); the reaper re-queues a job
  whose heartbeat goes stale.
- ``should_stop`` reads the cancel flag at most once per ``cancel_poll_s``. It also stops a run
  that lost the job (the reaper gave it to another worker: ``run_token`` changed); every write of
  such a run is fenced by ``run_token`` and dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import crud
from api.db import session_scope
from api.models import Dataset
from api.settings import get_settings
from api.states import IllegalTransition, JobStatus
from trinity_core.errors import JobCancelled, TrinityError
from trinity_core.events import Event

log = logging.getLogger("trinity.worker")
S = JobStatus
METRIC_FIELDS = ("step", "total_steps", "loss", "tokens_per_s", "eta_s", "peak_mem_gib")


@dataclass
class Run:
    job_id: str
    run_token: int
    spec: dict[str, Any]
    dataset_path: str | None
    workdir: Path
    attempts: list[dict[str, Any]]
    eval_dataset_path: str | None = None  # the stored file of data.eval_dataset_id


def claim(job_id: str, *, worker: str) -> Run | None:
    """The atomic claim (queued → running); None for a duplicate, cancelled or finished job."""
    from trinity_core.oom import Settings as LadderSettings
    from trinity_core.spec import parse_spec

    with session_scope() as session:
        job = crud.claim_job(session=session, job_id=job_id, worker=worker)
        if job is None:
            return None
        if job.rung is None:  # first run: the spec's own settings are what runs until a downgrade
            settings = LadderSettings.from_spec(parse_spec(job.spec)).to_dict()
            crud.heartbeat(session=session, job_id=job.id, run_token=job.run_token, rung="recipe", settings=settings)
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        eval_id = (job.spec.get("data") or {}).get("eval_dataset_id")
        eval_dataset = session.get(Dataset, eval_id) if eval_id else None
        return Run(job.id, job.run_token, job.spec, dataset.path if dataset else None,
                   get_settings().jobs_dir / job.id, list(job.attempts or []),
                   eval_dataset.path if eval_dataset and eval_dataset.tenant == job.tenant else None)


def run(job: Run) -> Any:
    """Call run_job on the job's workdir (which resumes from its newest checkpoint)."""
    from trinity_core.pipeline import run_job

    spec = job_spec(job)
    with Recorder(job) as recorder:
        return run_job(spec, job.workdir, recorder.on_event, should_stop=recorder.should_stop,
                       on_step=recorder.on_step, mlflow_uri=recorder.settings.mlflow_tracking_uri or None)


def job_spec(job: Run) -> Any:
    """The stored spec with ``data.dataset_id`` and ``data.eval_dataset_id`` rewritten to their stored
    files (``data.path``, ``data.eval_path``)."""
    from trinity_core.errors import DatasetError
    from trinity_core.spec import parse_spec

    raw = {**job.spec, "data": dict(job.spec.get("data") or {})}
    if raw["data"].pop("dataset_id", None):
        if not job.dataset_path or not Path(job.dataset_path).is_file():
            raise DatasetError("the uploaded dataset file is missing on the server", param="data.dataset_id")
        raw["data"]["path"] = job.dataset_path
    if raw["data"].pop("eval_dataset_id", None):
        if not job.eval_dataset_path or not Path(job.eval_dataset_path).is_file():
            raise DatasetError("the uploaded eval dataset file is missing on the server", param="data.eval_dataset_id")
        raw["data"]["eval_path"] = job.eval_dataset_path
    return parse_spec(raw, require_data=True)


class Recorder:
    def __init__(self, job: Run):
        self.job = job
        self.settings = get_settings()
        self.attempts = list(job.attempts)
        self.lost = False
        self._last_stop_check = 0.0
        self._stop = False
        self._last_beat = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name=f"heartbeat-{job.job_id}", daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _beat_forever(self) -> None:
        while not self._done.wait(self.settings.heartbeat_interval_s):
            self._beat()

    def _beat(self, **progress: Any) -> None:
        self._last_beat = time.monotonic()
        try:
            with session_scope() as session:
                if not crud.heartbeat(session=session, job_id=self.job.job_id, run_token=self.job.run_token,
                                      **progress):
                    self.lost = True
        except Exception as error:  # a DB hiccup must not kill a long training run
            log.warning("heartbeat for %s failed: %s", self.job.job_id, error)

    def on_step(self, step: int) -> None:
        if time.monotonic() - self._last_beat >= 1.0:
            self._beat(step=step)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if self.lost or self._stop or now - self._last_stop_check < self.settings.cancel_poll_s:
            return self.lost or self._stop
        self._last_stop_check = now
        try:
            with session_scope() as session:
                self._stop = crud.stop_requested(session=session, job_id=self.job.job_id,
                                                 run_token=self.job.run_token)
        except Exception as error:
            log.warning("cancel check for %s failed: %s", self.job.job_id, error)
        return self._stop

    def on_event(self, event: Event) -> None:
        try:
            with session_scope() as session:
                seq = crud.record_event(
                    session=session, job_id=self.job.job_id, run_token=self.job.run_token, type=event.type,
                    level=event.level, message=event.message, data=_jsonable(event.data), time=event.time,
                    progress=self._progress(event))
            if seq is None:
                self.lost = True
        except Exception as error:
            log.warning("could not store event of %s: %s", self.job.job_id, error)

    def _progress(self, event: Event) -> dict[str, Any]:
        data = event.data or {}
        if event.type == "metrics":
            return {k: data[k] for k in METRIC_FIELDS if data.get(k) is not None}
        if event.type == "status" and data.get("stage"):
            return {"stage": str(data["stage"])[:40]}
        if event.level == "warning" and "settings" in data and "rung" in data:  # an OOM-ladder downgrade
            if not self.attempts:
                self.attempts.append({"rung": "recipe", "outcome": "oom"})
            elif self.attempts[-1].get("outcome") == "running":
                self.attempts[-1] = {**self.attempts[-1], "outcome": "oom"}
            self.attempts.append({"rung": data["rung"], "settings": data["settings"], "outcome": "running"})
            return {"rung": data["rung"], "settings": data["settings"], "attempts": list(self.attempts)}
        if event.level == "warning" and "rung" in data:  # pre-flight: the rung about to run cannot fit
            if self.attempts and self.attempts[-1].get("rung") == data["rung"]:
                self.attempts[-1] = {**self.attempts[-1], "outcome": "skipped"}
            else:
                self.attempts.append({"rung": data["rung"], "outcome": "skipped"})
            return {"attempts": list(self.attempts)}
        return {}


def _jsonable(data: dict[str, Any] | None) -> dict[str, Any]:
    """Event data as plain JSON (numpy scalars, paths... become numbers or strings)."""
    return json.loads(json.dumps(data or {}, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# ── Endings ──────────────────────────────────────────────────────────────────────────────────
# The worker owns a job's ending: its status transition is the one terminal status event
# (run_job emits none; its failures and cancellation are exceptions).

def _finish(job: Run, to: JobStatus, message: str, *, level: str = "info", **values: Any) -> str:
    try:
        with session_scope() as session:
            done = crud.transition(session=session, job_id=job.job_id, to=to, run_token=job.run_token,
                                   only_from={S.running, S.cancelling}, level=level, message=message,
                                   values=values, event_data={"error": values["error"]} if "error" in values else None)
    except IllegalTransition as error:
        log.warning("%s: %s", job.job_id, error)
        return "lost"
    return to.value if done is not None else "lost"  # lost: another run owns the job now


def succeed(job: Run, result: Any) -> str:
    result = result.to_dict()
    _ensure_manifest(job.workdir)
    return _finish(job, S.succeeded, "succeeded", result=result, attempts=result.get("attempts") or [],
                   rung=result.get("final_rung"), settings=result.get("final_settings"),
                   step=result.get("global_step"), eta_s=0.0, stage="done")


def cancelled(job: Run, stopped: JobCancelled) -> str:
    details = stopped.details if isinstance(stopped.details, dict) else {}
    extra = {"result": details, "attempts": details["attempts"]} if details.get("attempts") else {}
    return _finish(job, S.cancelled, stopped.message, **extra)


def fail(job: Run, error: BaseException) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(error, TrinityError):
        body = error.to_dict()
    elif isinstance(error, SoftTimeLimitExceeded):
        body = {"code": "time_limit_exceeded", "message": "the job ran past the worker's time limit", "param": None}
    else:
        log.error("job %s crashed", job.job_id, exc_info=error)
        body = {"code": "internal_error", "message": f"{type(error).__name__}: {error}", "param": None}
    body = _scrub_paths(body, job.workdir)
    extra = {}
    if body["code"] == "oom_ladder_exhausted" and isinstance(body.get("details"), list):
        extra["attempts"] = body["details"]
    return _finish(job, S.failed, f"failed: {body['message']}", level="error", error=body, **extra)


def _scrub_paths(body: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """No server paths in the API: the job's workdir becomes relative, the data dir ``<data_dir>``
    (a disk-full error named ``/srv/.../jobs/<id>/merged``; found by tests/reliability)."""
    text = json.dumps(body)
    for prefix, replacement in ((f"{workdir}/", ""), (str(workdir), "."), (str(get_settings().data_dir), "<data_dir>")):
        text = text.replace(json.dumps(prefix)[1:-1], replacement)
    return json.loads(text)


def requeue(job: Run, error: TrinityError, *, task_id: str, countdown: float, attempt: int) -> bool:
    """A retryable error (hub download): back to queued; Celery re-sends the task after ``countdown``."""
    try:
        with session_scope() as session:
            done = crud.transition(
                session=session, job_id=job.job_id, to=S.queued, run_token=job.run_token, only_from={S.running},
                level="warning", message=f"{error.message}; retry {attempt} in {countdown:.0f} s",
                values={"task_id": task_id, "enqueued_at": time.time() + countdown},
                event_data={"error": error.to_dict()})
    except IllegalTransition:  # cancelling (or lost): no retry, the caller records the ending
        return False
    return done is not None


def _ensure_manifest(workdir: Path) -> None:
    """The manifest is the core's (``artifacts.json``); build it from the workdir if run_job did not."""
    from trinity_core import artifacts

    if not (workdir / artifacts.MANIFEST).exists():
        try:
            artifacts.write_manifest(workdir)
        except Exception as error:
            log.warning("could not write the manifest of %s: %s", workdir, error)

