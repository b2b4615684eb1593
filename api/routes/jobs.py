"""POST /jobs, GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response
from sqlmodel import Session

from api import crud
from api.admission import admit
from api.deps import JobDep, SessionDep, SettingsDep, TenantDep
from api.errors import ApiError, ErrorResponse
from api.models import Job, JobList, JobPublic
from api.policy import spec_problems
from api.settings import Settings
from api.states import IllegalTransition, JobStatus
from trinity_core.errors import SpecError
from trinity_core.spec import parse_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])

SPEC_BODY = Body(description="The job spec (trinity_core.spec.JobSpec); the dataset is data.dataset_id "
                             "from POST /datasets (or data.hub).")


@router.post("", status_code=201, response_model=JobPublic,
             responses={200: {"description": "Replay of an Idempotency-Key: the job created the first time"},
                        409: {"description": "Idempotency-Key reused with another body"},
                        422: {"description": "Every problem in the spec (invalid_spec), or only the model "
                                              "cannot be found now (model_unavailable)"}})
def create_job(
    body: Annotated[dict[str, Any], SPEC_BODY], response: Response, session: SessionDep, tenant: TenantDep,
    settings: SettingsDep, queue: Annotated[str | None, Query(description="GPU queue, e.g. gpu.t4")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """Create a fine-tuning job. The row is committed, then the job id is enqueued."""
    queue = queue or settings.default_queue
    dataset_id = validate_request(session=session, tenant=tenant, body=body, queue=queue, settings=settings)
    try:
        job, created = crud.create_job(session=session, tenant=tenant, spec=body, queue=queue,
                                       dataset_id=dataset_id, idempotency_key=idempotency_key,
                                       body_hash=crud.request_hash(body, queue))
    except crud.IdempotencyConflict as conflict:
        raise ApiError(409, "idempotency_key_reused", f"this Idempotency-Key was used for job {conflict} "
                       "with another request body", param="Idempotency-Key") from None
    if created:
        admitted = admit(session=session, job=job)
        if admitted is None:  # the reaper admitted (and enqueued) it meanwhile: answer its current row
            job = crud.get_job(session=session, tenant=tenant, job_id=job.id) or job
        else:
            job = admitted
        if admitted is not None and job.status == JobStatus.queued:
            from worker.app import enqueue

            enqueue(session=session, job=job)
    else:
        response.status_code = 200
    return public(session, job)


def validate_request(*, session: Session, tenant: str, body: dict[str, Any], queue: str,
                     settings: Settings) -> str | None:
    """Collect every problem (spec, service policy, dataset, queue) and raise one 422."""
    problems: list[dict[str, str]] = []
    try:
        parse_spec(body)
    except SpecError as error:
        problems += error.details or [{"loc": error.param or "(spec)", "msg": error.message}]
    problems += spec_problems(body, settings)
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    dataset_id = data.get("dataset_id") if isinstance(data.get("dataset_id"), str) else None
    if dataset_id:
        dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
        if dataset is None:
            problems.append({"loc": "data.dataset_id", "msg": f"no dataset {dataset_id!r}"})
        elif not dataset.ok and not data.get("drop_invalid_rows"):
            problems.append({"loc": "data.dataset_id", "msg": f"dataset {dataset_id} is invalid "
                             f"({dataset.report.get('summary', 'see GET /datasets/' + dataset_id)}); fix the file "
                             "and upload it again, or set data.drop_invalid_rows"})
    if queue not in settings.gpu_queues:
        problems.append({"loc": "queue", "msg": f"unknown queue; use one of {', '.join(settings.gpu_queues)}"})
    if problems:  # model_unavailable when that is all that is wrong: the spec itself is fine
        code = "model_unavailable" if all(p.get("code") == "model_unavailable" for p in problems) else "invalid_spec"
        message = f"{len(problems)} problem(s): " + "; ".join(f"{p['loc']}: {p['msg']}" for p in problems)
        raise ApiError(422, code, message, param=problems[0]["loc"], details=problems)
    return dataset_id


def public(session: Session, job: Job) -> JobPublic:
    return JobPublic.of(job, queue_position=crud.queue_position(session=session, job=job))


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep, tenant: TenantDep, status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="Id of the last job of the previous page")] = None,
):
    """Newest first."""
    jobs, more = crud.list_jobs(session=session, tenant=tenant, limit=limit, after=after, status=status)
    return JobList(data=[public(session, j) for j in jobs], has_more=more)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, job: JobDep):
    return public(session, job)


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={409: {"model": ErrorResponse, "description": "The job has already finished"}})
def cancel_job(session: SessionDep, job: JobDep):
    """A queued job is cancelled at once and never starts; a running one becomes ``cancelling`` and
    stops at its next step boundary, keeping its last checkpoint, then ``cancelled``."""
    try:
        job = crud.request_cancel(session=session, job=job)
    except IllegalTransition as error:
        raise ApiError(409, "job_finished", f"job {job.id} has already finished ({job.status.value})",
                       param="job_id") from error
    return public(session, job)
