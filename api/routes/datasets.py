"""POST /datasets (streamed upload, validated by the core), GET /datasets, GET /datasets/{id},
DELETE /datasets/{id} (one no job uses).

Store-and-report: a file with at least one valid row is stored and returned with its full
report (201, ``status: valid|invalid``, every error with its row number); a job refuses an
invalid dataset unless its spec sets ``data.drop_invalid_rows``. A file with no usable row at all
(unreadable, unknown format, zero valid rows) is refused with 422 and nothing is kept.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Path as PathParam, Query, Request
from starlette.concurrency import run_in_threadpool

from trinity_service import crud
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import UPLOAD_RESPONSES, ApiError, not_found
from trinity_service.models import Dataset, DatasetList, DatasetPublic, new_id
from api.policy import model_problem
from trinity_service.settings import Settings
from api.uploads import Upload, receive_upload
from trinity_core.errors import DatasetError
from trinity_core.spec import DataSpec

router = APIRouter(prefix="/datasets", tags=["datasets"])

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
FORMATS = get_args(DataSpec.model_fields["format"].annotation)
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": f"{', '.join(SUFFIXES)}"},
        "format": {"type": "string", "enum": list(FORMATS), "default": "auto"},
        "columns": {"type": "string", "description": 'JSON object, e.g. {"question": "instruction"}'},
        "tokenizer": {"type": "string", "description": "Model whose tokenizer measures tokens (hub id or "
                      "a directory in TRINITY_MODEL_DIRS); without it lengths are in characters"},
        "max_seq_length": {"type": "integer", "description": "With tokenizer: rows longer are errors"},
    }}}}}}


def _suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise ApiError(422, "unsupported_file_type",
                       f"{filename!r}: use one of {', '.join(SUFFIXES)}", param="file")
    return suffix


@router.post("", status_code=201, response_model=DatasetPublic, openapi_extra=UPLOAD_BODY, responses=UPLOAD_RESPONSES)
async def upload_dataset(request: Request, session: SessionDep, tenant: TenantDep, settings: SettingsDep):
    """Upload a training file (JSONL, JSON, Parquet, CSV); it is validated row by row."""
    upload = await receive_upload(request, tmp_dir=settings.datasets_dir / ".tmp",
                                  max_bytes=settings.max_upload_bytes, suffix_of=_suffix)
    try:
        dataset = await run_in_threadpool(store_dataset, upload, session=session, tenant=tenant, settings=settings)
    finally:
        upload.discard()
    return DatasetPublic.of(dataset)


def store_dataset(upload: Upload, *, session, tenant: str, settings: Settings) -> Dataset:  # noqa: ANN001
    from trinity_core.data.prepare import validate_file

    options = _options(upload.fields, settings)
    try:
        report = validate_file(upload.path, **options)
    except DatasetError as error:  # cannot be opened at all; never leak the temp path
        raise ApiError(422, "invalid_dataset", _scrub(error.message, upload), param="file") from None
    summary = report.to_dict() | {"source": upload.filename, "summary": _scrub(report.summary(), upload)}
    if not report.stats.get("valid_rows"):
        raise ApiError(422, "invalid_dataset", f"no usable rows: {summary['summary']}", param="file",
                       details=report.errors)
    dataset_id = new_id("ds")
    final = settings.datasets_dir / dataset_id / f"data{upload.path.suffix}"
    final.parent.mkdir(parents=True)
    os.replace(upload.path, final)
    try:
        return crud.create_dataset(session=session, dataset=Dataset(
            id=dataset_id, tenant=tenant, filename=upload.filename, path=str(final), format=report.format,
            size_bytes=upload.size, sha256=upload.sha256, ok=report.ok, rows=report.stats.get("rows"),
            report=summary))
    except BaseException:
        final.unlink(missing_ok=True)
        final.parent.rmdir()
        raise


def _scrub(text: str, upload: Upload) -> str:
    return text.replace(str(upload.path), upload.filename).replace(upload.path.name, upload.filename)


def _options(fields: dict[str, str], settings: Settings) -> dict[str, Any]:
    problems = []
    fmt = fields.get("format", "auto") or "auto"
    if fmt not in FORMATS:
        problems.append({"loc": "format", "msg": f"use one of {', '.join(FORMATS)}"})
    columns = None
    if fields.get("columns"):
        try:
            columns = json.loads(fields["columns"])
            assert isinstance(columns, dict) and all(isinstance(v, str) for v in columns.values())
        except (ValueError, AssertionError):
            problems.append({"loc": "columns", "msg": "must be a JSON object of strings"})
    max_len = None
    if fields.get("max_seq_length"):
        if not fields["max_seq_length"].isdigit() or int(fields["max_seq_length"]) < 1:
            problems.append({"loc": "max_seq_length", "msg": "must be a positive integer"})
        else:
            max_len = int(fields["max_seq_length"])
    tokenizer_name = fields.get("tokenizer") or None
    if tokenizer_name and (msg := model_problem(tokenizer_name, settings)):
        problems.append({"loc": "tokenizer", "msg": msg})
    if problems:
        raise ApiError(422, "invalid_request", "; ".join(f"{p['loc']}: {p['msg']}" for p in problems),
                       param=problems[0]["loc"], details=problems)
    tokenizer = None
    if tokenizer_name:
        try:
            tokenizer = _load_tokenizer(tokenizer_name)
        except Exception as error:  # transformers raises OSError/ValueError/HTTP errors for a bad name
            raise ApiError(422, "invalid_request", f"cannot load tokenizer {tokenizer_name!r}: {error}",
                           param="tokenizer") from None
    return {"format": fmt, "columns": columns, "tokenizer": tokenizer, "max_seq_length": max_len}


@lru_cache(maxsize=4)
def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  after: str | None = None):
    rows, more = crud.list_datasets(session=session, tenant=tenant, limit=limit, after=after)
    return DatasetList(data=[DatasetPublic.of(d) for d in rows], has_more=more)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(session: SessionDep, tenant: TenantDep, dataset_id: Annotated[str, PathParam()]):
    dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id, "dataset_id")
    return DatasetPublic.of(dataset)


@router.delete("/{dataset_id}", status_code=204,
               responses={409: {"description": "A job uses the dataset"}})
def delete_dataset(session: SessionDep, tenant: TenantDep, dataset_id: Annotated[str, PathParam()]) -> None:
    """Delete a dataset and its file; refused (409) while a job refers to it."""
    remove_dataset(session=session, tenant=tenant, dataset_id=dataset_id)


def remove_dataset(*, session, tenant: str, dataset_id: str) -> None:  # noqa: ANN001
    """Delete a tenant's dataset row and its directory; 404 when missing, 409 when a job uses it."""
    import shutil

    dataset = crud.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id, "dataset_id")
    path = Path(dataset.path)
    if not crud.delete_dataset(session=session, dataset=dataset):
        raise ApiError(409, "dataset_in_use", f"a job uses dataset {dataset_id}", param="dataset_id")
    if path.parent.name == dataset_id:  # <datasets_dir>/<id>/, as store_dataset made it
        shutil.rmtree(path.parent, ignore_errors=True)
