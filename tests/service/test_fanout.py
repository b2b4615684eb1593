"""The API's hot paths (issue 20): the key cache and its revocation, and SSE fan-out through Redis
pub/sub (``api/event_hub.py``): an event reaches every follower on its notification, with one
shared read and no polling. Real Redis (the test DB's server), real SQLite / PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from trinity_service import crud
from trinity_service.states import JobStatus as S

NO_POLL = {"TRINITY_SSE_POLL_S": "60", "TRINITY_SSE_FALLBACK_POLL_S": "60"}  # only a notification can wake a feed


@pytest.fixture
def configured(settings, monkeypatch, redis_client):
    """``settings`` with extra environment (``configured({...})``), the cache cleared."""
    from trinity_service.settings import get_settings

    def apply(env: dict[str, str]):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        return get_settings()

    return apply


def make_running_job(session) -> str:
    job, _ = crud.create_job(session=session, tenant="t", spec={"data": {"hub": "x/y"}}, queue="q",
                             dataset_id=None)
    crud.transition(session=session, job_id=job.id, to=S.queued)
    crud.claim_job(session=session, job_id=job.id, worker="w1")
    return job.id


def wait_live(hub, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not hub.live:
        assert time.monotonic() < deadline, "the hub never subscribed to Redis"
        time.sleep(0.05)


# ── The key cache ────────────────────────────────────────────────────────────────────────────

def test_a_revoked_key_is_refused_at_once_through_the_notification(configured, session, enqueued):
    from fastapi.testclient import TestClient

    from api.main import create_app

    configured({"TRINITY_AUTH_CACHE_S": "600"})  # only the notification can drop the cached key
    row, key = crud.create_api_key(session=session, tenant="revoked-soon")
    with TestClient(create_app()) as client:
        wait_live(client.app.state.event_hub)
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/jobs", headers=headers).status_code == 200  # cached now
        assert crud.revoke_api_key(session=session, key_id=row.id)  # publishes the key's hash
        deadline = time.monotonic() + 5
        while (r := client.get("/jobs", headers=headers)).status_code == 200:
            assert time.monotonic() < deadline, "a revoked key was still accepted 5 s after its revocation"
            time.sleep(0.02)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_without_notifications_a_revoked_key_is_refused_within_the_ttl(configured, session, enqueued):
    from fastapi.testclient import TestClient

    from api.main import create_app

    ttl = 1.0
    configured({"TRINITY_AUTH_CACHE_S": str(ttl), "TRINITY_NOTIFY_URL": "off"})
    row, key = crud.create_api_key(session=session, tenant="revoked-quietly")
    with TestClient(create_app()) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/jobs", headers=headers).status_code == 200
        revoked_at = time.monotonic()
        assert crud.revoke_api_key(session=session, key_id=row.id)
        # Within the TTL the cached key may still pass (the documented bound), never after it.
        while client.get("/jobs", headers=headers).status_code == 200:
            assert time.monotonic() - revoked_at <= ttl + 0.5, "accepted past auth_cache_s"
            time.sleep(0.05)
        assert time.monotonic() - revoked_at <= ttl + 0.5
        assert client.get("/jobs", headers={"Authorization": f"Bearer {key}x"}).status_code == 401


# ── SSE fan-out ──────────────────────────────────────────────────────────────────────────────

def test_an_event_reaches_every_follower_through_pubsub_with_one_shared_read(configured, session):
    """Polling is set to 60 s: delivery within 5 s can only come from the Redis notification. Three
    followers (two with filters) of one job; the feed reads the job once per notification."""
    from api.event_hub import EventHub
    from api.routes.events import _stream

    settings = configured(NO_POLL)
    job_id = make_running_job(session)
    first = crud.add_event(session=session, job_id=job_id, type="message", message="before anyone follows")

    async def scenario():
        hub = EventHub(settings)
        await hub.start()
        while not hub.live:
            await asyncio.sleep(0.02)
        got: dict[str, list[str]] = {"all": [], "metrics": [], "errors": []}

        async def follow(name, levels, types):
            async for chunk in _stream(hub, job_id, 0, levels, types):
                got[name].append(chunk)

        tasks = [asyncio.create_task(follow("all", None, None)),
                 asyncio.create_task(follow("metrics", None, ["metrics"])),
                 asyncio.create_task(follow("errors", ["error"], None))]
        while len(got["all"]) < 1 + first:  # "retry" + the replayed events
            await asyncio.sleep(0.02)
        reads_before = hub.reads
        sent = time.monotonic()
        seq = await asyncio.to_thread(_add_metrics, job_id)
        while not (any(f"id: {seq}\n" in c for c in got["all"]) and any(f"id: {seq}\n" in c for c in got["metrics"])):
            assert time.monotonic() - sent < 5, "the notification did not wake the followers"
            await asyncio.sleep(0.01)
        shared_reads = hub.reads - reads_before
        for task in tasks:
            task.cancel()
        await hub.stop()
        return got, seq, shared_reads

    got, seq, shared_reads = asyncio.run(scenario())
    assert shared_reads == 1  # one query for three followers
    assert [c.split("\n")[0] for c in got["all"] if c.startswith("id:")] == [f"id: {s}" for s in range(1, seq + 1)]
    assert [c.split("\n")[0] for c in got["metrics"] if c.startswith("id:")] == [f"id: {seq}"]
    assert not [c for c in got["errors"] if c.startswith("id:")]  # filtered out, as before


def _add_metrics(job_id: str) -> int:
    from trinity_service.db import session_scope

    with session_scope() as s:
        return crud.add_event(session=s, job_id=job_id, type="metrics", message="step 1", data={"step": 1})


def test_the_stream_ends_after_the_terminal_event_through_the_feed(configured, session, enqueued):
    """Last-Event-ID resume and the end event, served from the shared feed, over HTTP."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    configured(NO_POLL)
    job_id = make_running_job(session)
    tenant_key = crud.create_api_key(session=session, tenant="t")[1]
    with TestClient(create_app()) as client:
        wait_live(client.app.state.event_hub)

        def finish():
            time.sleep(0.5)
            from trinity_service.db import session_scope

            with session_scope() as s:
                crud.add_event(session=s, job_id=job_id, type="message", message="last words")
                crud.transition(session=s, job_id=job_id, to=S.succeeded)

        threading.Thread(target=finish).start()
        started = time.monotonic()
        r = client.get(f"/jobs/{job_id}/events/stream", headers={"Authorization": f"Bearer {tenant_key}",
                                                                  "Last-Event-ID": "1"})
        assert time.monotonic() - started < 5
    blocks = [b for b in r.text.strip().split("\n\n") if b.startswith(("id:", "event:"))]
    ids = [int(b.split("\n")[0][4:]) for b in blocks if b.startswith("id:")]
    assert ids == list(range(2, ids[-1] + 1)) and ids[-1] >= 4  # claim's status event, last words, succeeded
    assert blocks[-1] == 'event: end\ndata: {"status": "succeeded"}'
