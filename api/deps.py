"""Typed dependencies: ``SessionDep``, ``TenantDep`` (the caller's tenant, from its API key; cached),
``SettingsDep``, and ``JobDep`` (a job of the caller's tenant, else 404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from api import auth
from trinity_service import crud
from trinity_service.db import get_session
from api.errors import ApiError, not_found
from trinity_service.models import Job
from trinity_service.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key> (`trinity keys create`)")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_tenant(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """Async, and cached for ``auth_cache_s`` (``api/auth.py``): a poll costs no thread hop and no
    key lookup. (``SettingsDep`` would be one: FastAPI runs a sync dependency in the threadpool.)"""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    tenant = await auth.tenant_for(credentials.credentials, get_settings().auth_cache_s)
    if tenant is None:
        raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked", headers=_CHALLENGE)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def get_own_job(session: SessionDep, tenant: TenantDep, job_id: Annotated[str, Path()]) -> Job:
    """Another tenant's job is reported exactly like a missing one (404, not 403)."""
    job = crud.get_job(session=session, tenant=tenant, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, "job_id")
    return job


JobDep = Annotated[Job, Depends(get_own_job)]
