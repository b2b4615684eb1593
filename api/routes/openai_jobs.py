"""OpenAI's fine-tuning jobs API under /v1: ``client.fine_tuning.jobs.create/retrieve/list/cancel/
list_events`` and ``jobs.checkpoints.list``.

A create request is translated into a Trinity spec (``api.openai_compat.to_spec``), checked by the
same code as ``POST /jobs`` (every problem at once, reported under the request's own parameter
names, 400 as OpenAI answers) and submitted through ``api.submit``. Every job of the tenant is
visible here, including those created by ``POST /jobs``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query

from api import submit
from trinity_service import crud
from api.deps import JobDep, SessionDep, SettingsDep, TenantDep
from api.errors import ErrorResponse
from trinity_service.models import Job
from api.openai_compat import (
    checkpoint_object,
    cursor_seq,
    event_object,
    job_object,
    rename_params,
    resolved_hyperparameters,
    to_spec,
    unsupported,
)
from api.openai_models import CheckpointList, FineTuningJob, FineTuningJobCreate, FineTuningJobList, JobEventList
from api.routes.artifacts import checkpoints
from api.routes.jobs import cancel
from trinity_core.spec import parse_spec

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"])
Limit = Annotated[int, Query(ge=1, le=100)]


def _object(session, job: Job) -> FineTuningJob:  # noqa: ANN001
    return job_object(job, crud.openai_extras(session=session, job_ids=[job.id]).get(job.id))


@router.post("", response_model=FineTuningJob,
             responses={400: {"model": ErrorResponse, "description": "Every problem of the request"},
                        409: {"model": ErrorResponse, "description": "This Idempotency-Key was used with another body"}})
def create_fine_tuning_job(
    body: FineTuningJobCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """The request becomes a Trinity job spec, checked and submitted like ``POST /jobs``."""
    if error := unsupported(body):
        raise error
    dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=body.training_file)
    raw = to_spec(body, dataset)
    queue = body.queue  # None: routed by the job's memory estimate (api/routing.py)
    if found := submit.problems(session=session, tenant=tenant, body=raw, queue=queue, settings=settings):
        raise submit.refuse(rename_params(found))
    spec = parse_spec(raw)
    extras = {"labels": dict(body.metadata or {}),
              "hyperparameters": resolved_hyperparameters(body, submit.normalised(spec))}
    job, _ = submit.submit(session=session, tenant=tenant, spec=spec, queue=queue, idempotency_key=idempotency_key,
                           settings=settings, request=body.model_dump(mode="json"), openai=extras)
    return _object(session, job)


@router.get("", response_model=FineTuningJobList)
def list_fine_tuning_jobs(session: SessionDep, tenant: TenantDep, limit: Limit = 20,
                          after: Annotated[str | None, Query(description="Id of the last job of the previous page")] = None):
    """Newest first."""
    jobs, more = crud.list_jobs(session=session, tenant=tenant, limit=limit, after=after)
    extras = crud.openai_extras(session=session, job_ids=[j.id for j in jobs])
    return FineTuningJobList(data=[job_object(j, extras.get(j.id)) for j in jobs], has_more=more)


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(session: SessionDep, job: JobDep):
    return _object(session, job)


@router.post("/{job_id}/cancel", response_model=FineTuningJob,
             responses={409: {"model": ErrorResponse, "description": "The job has already finished"}})
def cancel_fine_tuning_job(session: SessionDep, job: JobDep):
    """A queued job is cancelled at once; a running one shows ``running`` until its worker stops at
    the next step boundary, then ``cancelled``."""
    return _object(session, cancel(session, job))


@router.get("/{job_id}/events", response_model=JobEventList)
def list_fine_tuning_events(session: SessionDep, job: JobDep, limit: Limit = 20,
                            after: Annotated[str | None, Query(description="Id of the last event seen")] = None):
    """Newest first; ``after`` pages back to older events."""
    before = cursor_seq(after, "ftevent-")
    events, more = crud.list_events(session=session, job_id=job.id, limit=limit, before=before, newest_first=True)
    return JobEventList(data=[event_object(job.id, e) for e in events], has_more=more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tuning_checkpoints(session: SessionDep, job: JobDep, settings: SettingsDep, limit: Limit = 10,
                                 after: Annotated[str | None, Query(description="Id of the last checkpoint seen")] = None):
    """The job's complete checkpoints, newest first, each with the training loss at its step."""
    before = cursor_seq(after, "ftckpt-")
    found = [c for c in reversed(checkpoints(settings, job.id)) if before is None or c.step < before]
    page = found[:limit]
    metrics, _ = crud.list_events(session=session, job_id=job.id, types=["metrics"], limit=1_000_000)
    losses = {int(e.data["step"]): e.data.get("loss") for e in metrics if isinstance(e.data.get("step"), int)}
    data = [checkpoint_object(job, c, losses) for c in page]
    return CheckpointList(data=data, has_more=len(found) > limit, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)
