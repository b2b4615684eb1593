"""API key → tenant, with a short in-process cache so a hot poll does not read the key table.

Only known, unrevoked keys are cached (by their sha256, never the plaintext), for at most
``Settings.auth_cache_s`` seconds. Revocation stays correct: ``crud.revoke_api_key`` publishes the
key's hash (``trinity_service.notify``) and every API process drops it from its cache as soon as
the message arrives (``api/event_hub.py``); when Redis is down, a revoked key is refused at the
latest ``auth_cache_s`` after its revocation. A miss reads the table in the threadpool, once
for all the requests that miss the same key at the same time.
"""

from __future__ import annotations

import asyncio
import time

from starlette.concurrency import run_in_threadpool

from trinity_service import crud
from trinity_service.db import session_scope
from trinity_service.security import hash_key

_cache: dict[str, tuple[str, float]] = {}  # sha256 of the key → (tenant, monotonic expiry)
MAX_ENTRIES = 10_000  # keys are few; this only bounds memory against a flood of distinct good keys
_pending: dict[str, asyncio.Task] = {}  # sha256 of the key → its table read in flight


async def tenant_for(key: str, ttl_s: float) -> str | None:
    """The key's tenant, or None (unknown or revoked)."""
    digest = hash_key(key)
    hit = _cache.get(digest)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    tenant = await _shared_lookup(digest, key)
    if tenant is None:
        _cache.pop(digest, None)
    elif ttl_s > 0:
        if len(_cache) >= MAX_ENTRIES:
            _cache.clear()
        _cache[digest] = (tenant, now + ttl_s)
    return tenant


async def _shared_lookup(digest: str, key: str) -> str | None:
    """One table read per key at a time in this event loop. When a cached key expired under load,
    every request in flight missed it together and each took a thread for the same read (100
    clients: up to 100 reads; ~6% of a poll's samples in py-spy). A request that misses while a
    read is running shares its answer: a read that began at most one read's time before it came."""
    loop = asyncio.get_running_loop()
    pending = _pending.get(digest)
    if pending is None or pending.get_loop() is not loop:  # none, or another loop's (a test's other app)
        pending = loop.create_task(run_in_threadpool(_lookup, key))
        _pending[digest] = pending

        def done(task: asyncio.Task) -> None:
            if _pending.get(digest) is task:
                del _pending[digest]

        pending.add_done_callback(done)
    return await asyncio.shield(pending)


def _lookup(key: str) -> str | None:
    with session_scope() as session:
        return crud.authenticate(session=session, key=key)


def forget(key_hash: str | None = None) -> None:
    """Drop one key (by its sha256 hex) from the cache, or every key."""
    if key_hash is None:
        _cache.clear()
    else:
        _cache.pop(key_hash, None)
