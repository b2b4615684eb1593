"""API key → tenant, with a short in-process cache so a hot poll does not read the key table.

Only known, unrevoked keys are cached (by their sha256, never the plaintext), for at most
``Settings.auth_cache_s`` seconds. Revocation stays correct: ``crud.revoke_api_key`` publishes the
key's hash (``trinity_service.notify``) and every API process drops it from its cache as soon as
the message arrives (``api/event_hub.py``); when Redis is down, a revoked key is refused at the
latest ``auth_cache_s`` after its revocation. A miss reads the table in the threadpool.
"""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool

from trinity_service import crud
from trinity_service.db import session_scope
from trinity_service.security import hash_key

_cache: dict[str, tuple[str, float]] = {}  # sha256 of the key → (tenant, monotonic expiry)
MAX_ENTRIES = 10_000  # keys are few; this only bounds memory against a flood of distinct good keys


async def tenant_for(key: str, ttl_s: float) -> str | None:
    """The key's tenant, or None (unknown or revoked)."""
    digest = hash_key(key)
    hit = _cache.get(digest)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    tenant = await run_in_threadpool(_lookup, key)
    if tenant is None:
        _cache.pop(digest, None)
    elif ttl_s > 0:
        if len(_cache) >= MAX_ENTRIES:
            _cache.clear()
        _cache[digest] = (tenant, now + ttl_s)
    return tenant


def _lookup(key: str) -> str | None:
    with session_scope() as session:
        return crud.authenticate(session=session, key=key)


def forget(key_hash: str | None = None) -> None:
    """Drop one key (by its sha256 hex) from the cache, or every key."""
    if key_hash is None:
        _cache.clear()
    else:
        _cache.pop(key_hash, None)
