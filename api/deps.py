"""Typed dependencies: ``SessionDep``, ``TenantDep`` (the caller's tenant, from its API key; cached),
``SettingsDep``, and ``JobDep`` (a job of the caller's tenant, else 404); ``bearer_key`` and
``tenant_of`` for a route that reads the key itself (GET /jobs/{id})."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
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
    return await tenant_of(None if credentials is None else credentials.credentials)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization`` header's value, parsed as ``HTTPBearer`` does (None: no
    header, another scheme, or no key): for a route that reads the header itself."""
    scheme, key = get_authorization_scheme_param(authorization)
    return key if scheme.lower() == "bearer" and key else None


async def tenant_of(key: str | None) -> str:
    """The key's tenant; else 401 ``missing_api_key`` (no key) or ``invalid_api_key`` (unknown or
    revoked)."""
    if not key:
        raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    tenant = await auth.tenant_for(key, get_settings().auth_cache_s)
    if tenant is None:
        raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked", headers=_CHALLENGE)
    return tenant


# For a route that reads the key itself (``bearer_key``): its OpenAPI security, as the
# ``get_tenant`` dependency gives the others.
BEARER_SECURITY = [{_bearer.scheme_name: []}]


TenantDep = Annotated[str, Depends(get_tenant)]


def get_own_job(session: SessionDep, tenant: TenantDep, job_id: Annotated[str, Path()]) -> Job:
    """Another tenant's job is reported exactly like a missing one (404, not 403)."""
    job = crud.get_job(session=session, tenant=tenant, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, "job_id")
    return job


JobDep = Annotated[Job, Depends(get_own_job)]
