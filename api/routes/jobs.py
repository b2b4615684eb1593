"""POST /jobs, GET /jobs, GET /jobs/{id} (the polled route: ``poll_router``), POST /jobs/{id}/cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api import poll, submit
from trinity_service import crud
from api.deps import BEARER_SECURITY, JobDep, SessionDep, SettingsDep, TenantDep, bearer_key, tenant_of
from api.errors import AUTHED_RESPONSES, ApiError, ErrorResponse, not_found
from trinity_service.models import Job, JobCreate, JobList, JobPublic
from trinity_service.states import IllegalTransition, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])
# GET /jobs/{id}, the route clients poll, is on a router of its own that ``api/main.py`` includes
# without the API-wide key dependency: the route reads the key itself. FastAPI solving
# ``get_tenant`` and ``HTTPBearer`` for it took about a fifth of the route's time (py-spy), more
# than the read. Same checks and errors, same schema (its security is declared by hand).
poll_router = APIRouter(prefix="/jobs", tags=["jobs"])


@poll_router.get("/{job_id}", response_model=JobPublic, openapi_extra={"security": BEARER_SECURITY},
                 responses={**AUTHED_RESPONSES, 404: {"model": ErrorResponse}})
async def get_job(request: Request, job_id: str) -> Response:
    """The hot poll (``api/poll.py``): async, one statement, and the body built once per change of
    the job's row; ``response_model`` stays for the schema, the body is JobPublic's own JSON."""
    tenant = await tenant_of(bearer_key(request.headers.get("authorization")))
    body = await poll.job_json(tenant, job_id)
    if body is None:
        raise not_found("job", job_id, "job_id")
    return Response(body, media_type="application/json")


@dataclass
class JobRequest:
    """What ``checked_request`` found acceptable: the queue asked for (None: routed by the estimate)."""

    queue: str | None


async def checked_request(
    request: Request, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    queue: Annotated[str | None, Query(description="GPU queue, e.g. gpu.t4; default: the smallest GPU class "
                                                   "the job's memory estimate fits (TRINITY_QUEUE_GPU_GIB)")] = None,
) -> JobRequest:
    """Every problem of the request at once (the spec's own with "did you mean", the service
    policy, the dataset, the queue) as one 422 ``invalid_spec``. FastAPI runs dependencies before
    it validates the typed body, so that validation (which stops at the spec) only sees a body
    already accepted here; a body that is not a JSON object is left to it (``invalid_request``)."""
    try:
        raw = await request.json()
    except ValueError:
        raw = None
    if isinstance(raw, dict):
        await run_in_threadpool(submit.check, session=session, tenant=tenant, body=raw, queue=queue,
                                settings=settings)
    return JobRequest(queue=queue)


@router.post("", status_code=201, response_model=JobPublic,
             responses={200: {"description": "Replay of an Idempotency-Key: the job created the first time"},
                        409: {"description": "Idempotency-Key reused with another body"},
                        422: {"description": "Every problem in the spec (invalid_spec), only the model "
                                              "cannot be found now (model_unavailable), or no queue's GPU fits "
                                              "the job's estimate (no_queue_fits, queue_too_small)"}})
def create_job(
    body: JobCreate, checked: Annotated[JobRequest, Depends(checked_request)], response: Response,
    session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """Create a fine-tuning job. The stored spec is the validated one with every default filled in;
    without ``queue`` the job goes to the smallest GPU class its memory estimate fits (``routing``
    on the job says which rule and estimate). The row is committed, then the job id is enqueued."""
    job, created = submit.submit(session=session, tenant=tenant, spec=body, queue=checked.queue,
                                 idempotency_key=idempotency_key, settings=settings)
    if not created:
        response.status_code = 200
    return public(session, job)


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


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={409: {"model": ErrorResponse, "description": "The job has already finished"}})
def cancel_job(session: SessionDep, job: JobDep):
    """A queued job is cancelled at once and never starts; a running one becomes ``cancelling`` and
    stops at its next step boundary, keeping its last checkpoint, then ``cancelled``."""
    return public(session, cancel(session, job))


def cancel(session, job):
    """Request the cancellation (crud), or 409 ``job_finished``: shared with /v1's cancel."""
    try:
        return crud.request_cancel(session=session, job=job)
    except IllegalTransition as error:
        raise ApiError(409, "job_finished", f"job {job.id} has already finished ({job.status.value})",
                       param="job_id") from error
