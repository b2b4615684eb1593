"""OpenAI's Files API under /v1 (``client.files.create/list/retrieve/delete/content``).

A file with purpose ``fine-tune`` is a Trinity dataset: the same streamed upload, row-by-row
validation and storage as ``POST /datasets``, the same id. A file with no usable row is refused
(400); one with some bad rows is stored with ``status: error`` and its summary in
``status_details``, and a job refuses it. A succeeded job's ``result_files`` (its step metrics as
CSV) are retrievable here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from trinity_service import crud
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import UPLOAD_RESPONSES, ApiError, not_found
from trinity_service.models import Job
from api.openai_compat import RESULTS_PREFIX, file_object, results_csv
from api.openai_models import FileDeleted, FileList, FileObject
from api.routes.datasets import SUFFIXES, _suffix, remove_dataset, store_dataset
from trinity_service.states import JobStatus
from api.uploads import receive_upload

router = APIRouter(prefix="/v1/files", tags=["openai"])
FileId = Annotated[str, PathParam()]
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary", "description": ", ".join(SUFFIXES)},
        "purpose": {"type": "string", "enum": ["fine-tune"]},
    }}}}}}


@router.post("", response_model=FileObject, openapi_extra=UPLOAD_BODY, responses=UPLOAD_RESPONSES)
async def create_file(request: Request, session: SessionDep, tenant: TenantDep, settings: SettingsDep):
    """``client.files.create(file=..., purpose="fine-tune")``: stored and validated like ``POST /datasets``."""
    upload = await receive_upload(request, tmp_dir=settings.datasets_dir / ".tmp",
                                  max_bytes=settings.max_upload_bytes, suffix_of=_suffix)
    try:
        if upload.fields.get("purpose") != "fine-tune":
            raise ApiError(400, "invalid_request", f"purpose {upload.fields.get('purpose')!r}: only 'fine-tune' "
                           "files can be uploaded", param="purpose")
        dataset = await run_in_threadpool(store_dataset, upload, session=session, tenant=tenant, settings=settings)
    finally:
        upload.discard()
    return file_object(dataset)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, tenant: TenantDep, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None):
    """Uploaded files, newest first (results files are not listed: they are named by their jobs)."""
    if purpose not in (None, "fine-tune"):
        return FileList(data=[], has_more=False, first_id=None, last_id=None)
    rows, more = crud.list_datasets(session=session, tenant=tenant, limit=limit, after=after)
    data = [file_object(d) for d in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(session: SessionDep, tenant: TenantDep, file_id: FileId):
    if file_id.startswith(RESULTS_PREFIX):
        job, csv = _results(session, tenant, file_id)
        return FileObject(id=file_id, bytes=len(csv.encode()), created_at=int(job.finished_at or job.created_at),
                          filename="step_metrics.csv", purpose="fine-tune-results", status="processed")
    dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=file_id)
    if dataset is None:
        raise not_found("file", file_id, "file_id")
    return file_object(dataset)


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}, "text/csv": {}}}})
def file_content(session: SessionDep, tenant: TenantDep, file_id: FileId):
    """The uploaded file as it was sent, or a results file's CSV."""
    if file_id.startswith(RESULTS_PREFIX):
        _, csv = _results(session, tenant, file_id)
        return Response(csv, media_type="text/csv")
    dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=file_id)
    if dataset is None or not Path(dataset.path).is_file():
        raise not_found("file", file_id, "file_id")
    return FileResponse(dataset.path, filename=dataset.filename, media_type="application/octet-stream")


@router.delete("/{file_id}", response_model=FileDeleted, responses={409: {"description": "A job uses the file"}})
def delete_file(session: SessionDep, tenant: TenantDep, file_id: FileId):
    """Refused (409) while a job refers to the file, like ``DELETE /datasets/{id}``."""
    if file_id.startswith(RESULTS_PREFIX):
        _results(session, tenant, file_id)
        raise ApiError(400, "invalid_request", "a results file goes when its job's data does", param="file_id")
    try:
        remove_dataset(session=session, tenant=tenant, dataset_id=file_id)
    except ApiError as error:
        if error.status == 404:
            raise not_found("file", file_id, "file_id") from None
        raise
    return FileDeleted(id=file_id, deleted=True)


def _results(session, tenant: str, file_id: str) -> tuple[Job, str]:  # noqa: ANN001
    job = crud.get_job(session=session, tenant=tenant, job_id=file_id.removeprefix(RESULTS_PREFIX))
    if job is None or job.status != JobStatus.succeeded:
        raise not_found("file", file_id, "file_id")
    events, _ = crud.list_events(session=session, job_id=job.id, types=["metrics"], limit=1_000_000)
    return job, results_csv(events)
