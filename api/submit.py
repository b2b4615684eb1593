"""Creating a job, the one path both ``POST /jobs`` and ``POST /v1/fine_tuning/jobs`` take.

``problems`` collects every problem of a request at once (the spec's own, with "did you mean",
the service policy, the dataset, the queue); ``submit`` stores the validated, normalised spec
(defaults fixed at submit time, so a later change of a default does not change a queued job),
admits it (``validating_files`` → ``queued``) and enqueues it after the commit.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from trinity_service import crud
from trinity_service import queue as job_queue  # `queue` is the parameter naming a job's queue here
from trinity_service.admission import admit
from api import routing
from api.errors import ApiError
from trinity_service.models import Job
from api.policy import spec_problems
from trinity_service.settings import Settings
from trinity_service.states import JobStatus
from trinity_core.errors import SpecError
from trinity_core.spec import JobSpec, parse_spec


def problems(*, session: Session, tenant: str, body: dict[str, Any], queue: str | None,
             settings: Settings) -> list[dict[str, str]]:
    """Every problem with a raw spec body and its queue (None: routed by the estimate later,
    ``api/routing.py``), as ``[{"loc", "msg"[, "code", "did_you_mean"]}]``."""
    found: list[dict[str, str]] = []
    try:
        parse_spec(body)
    except SpecError as error:
        found += error.details or [{"loc": error.param or "(spec)", "msg": error.message}]
    found += spec_problems(body, settings)
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    for loc in ("dataset_id", "eval_dataset_id"):
        dataset_id = data.get(loc) if isinstance(data.get(loc), str) else None
        if not dataset_id:
            continue
        dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
        if dataset is None:
            found.append({"loc": f"data.{loc}", "msg": f"no dataset {dataset_id!r}"})
        elif not dataset.ok and not data.get("drop_invalid_rows"):
            found.append({"loc": f"data.{loc}", "msg": f"dataset {dataset_id} is invalid "
                          f"({dataset.report.get('summary', 'see GET /datasets/' + dataset_id)}); fix the file "
                          "and upload it again, or set data.drop_invalid_rows"})
    if queue is not None and queue not in settings.gpu_queues:
        found.append({"loc": "queue", "msg": f"unknown queue; use one of {', '.join(settings.gpu_queues)}"})
    return found


def refuse(found: list[dict[str, str]]) -> ApiError:
    """One 422 for all problems: ``model_unavailable`` when that is all that is wrong, else ``invalid_spec``."""
    code = "model_unavailable" if all(p.get("code") == "model_unavailable" for p in found) else "invalid_spec"
    message = f"{len(found)} problem(s): " + "; ".join(f"{p['loc']}: {p['msg']}" for p in found)
    return ApiError(422, code, message, param=found[0]["loc"], details=found)


def check(*, session: Session, tenant: str, body: dict[str, Any], queue: str | None, settings: Settings) -> None:
    """Raise one ``ApiError`` (422) listing every problem, or return."""
    if found := problems(session=session, tenant=tenant, body=body, queue=queue, settings=settings):
        raise refuse(found)


def normalised(spec: JobSpec) -> dict[str, Any]:
    """The spec as stored: every field with its value now (unset optional fields left out)."""
    return spec.model_dump(mode="json", exclude_none=True)


def submit(*, session: Session, tenant: str, spec: JobSpec, queue: str | None, idempotency_key: str | None,
           settings: Settings, request: Any = None, openai: dict[str, Any] | None = None) -> tuple[Job, bool]:
    """Route, store, admit and enqueue a checked job; ``(job, created)``. ``queue``: the client's
    (None: the smallest GPU class its estimate fits, ``api/routing.py``, which may refuse it with a
    422). ``request`` (default: the normalised spec) is what an Idempotency-Key must see again to
    replay the first job; ``openai`` is stored with it (``JobOpenAI``) by ``/v1/fine_tuning/jobs``."""
    stored = normalised(spec)
    queue, why = routing.route(spec, queue, settings)
    try:
        job, created = crud.create_job(session=session, tenant=tenant, spec=stored, queue=queue, routing=why,
                                       dataset_id=spec.data.dataset_id, idempotency_key=idempotency_key, openai=openai,
                                       body_hash=crud.request_hash(stored if request is None else request, queue))
    except crud.IdempotencyConflict as conflict:
        raise ApiError(409, "idempotency_key_reused", f"this Idempotency-Key was used for job {conflict} "
                       "with another request body", param="Idempotency-Key") from None
    if not created:
        return job, False
    admitted = admit(session=session, job=job)
    if admitted is None:  # the reaper admitted (and enqueued) it meanwhile: answer its current row
        return crud.get_job(session=session, tenant=tenant, job_id=job.id) or job, True
    if admitted.status == JobStatus.queued:
        job_queue.enqueue(session=session, job=admitted)
    return admitted, True
