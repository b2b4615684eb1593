"""GET /jobs/{id}, the polled route (``api/poll.py``), on SQLite and PostgreSQL: the same bytes as
the ORM path at every stage of a job's life (each change seen by the next poll, despite the memo
of bodies), another tenant's job 404 even while its body is remembered, the key checks of every
route; the row-value queue position with ties; one key lookup for many concurrent misses; /livez."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from trinity_service import crud
from trinity_service.models import JobPublic
from trinity_service.states import JobStatus as S

from .conftest import job_body, new_tenant


def orm_json(session, job_id: str) -> bytes:
    """What the rest of the API builds for a job (POST /jobs, GET /jobs): ORM object → JobPublic."""
    job = crud.get_job(session=session, tenant=None, job_id=job_id)
    return JobPublic.of(job, queue_position=crud.queue_position(session=session, job=job)).model_dump_json().encode()


def polled(client, headers, job_id: str) -> bytes:
    r = client.get(f"/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.content


def test_each_poll_answers_what_the_orm_path_builds_through_a_jobs_life(client, session, auth, dataset_id):
    tenant, headers = auth
    first, job = (client.post("/jobs", headers=headers, json=job_body(dataset_id)).json() for _ in range(2))
    job_id = job["id"]
    stages = []

    def check(stage: str) -> None:
        body = polled(client, headers, job_id)
        assert body == polled(client, headers, job_id)  # the second poll: from the memo
        assert body == orm_json(session, job_id), stage
        stages.append(stage)

    check("queued, second in its queue")
    assert client.get(f"/jobs/{job_id}", headers=headers).json()["queue_position"] >= 2
    crud.request_cancel(session=session, job=crud.get_job(session=session, tenant=None, job_id=first["id"]))
    check("queued, the job ahead cancelled")
    running = crud.claim_job(session=session, job_id=job_id, worker="w1")
    check("running")
    settings = {"r": 32, "use_dora": False, "targets": ["q_proj", "v_proj"]}
    crud.heartbeat(session=session, job_id=job_id, run_token=running.run_token, stage="train", step=2,
                   total_steps=3, loss=1.25, tokens_per_s=812.5, eta_s=4.0, peak_mem_gib=0.5, rung="dora_off",
                   settings=settings, attempts=[{"rung": "recipe", "outcome": "oom", "seconds": 1.5}])
    check("running, progress and a downgrade")
    crud.heartbeat(session=session, job_id=job_id, run_token=running.run_token)
    check("running, only the heartbeat moved")
    result = {"loss_history": [[1, 2.0]], "workdir": "/srv/secret", "best_step": 2,
              "resolved_spec": {"data": {"path": "/srv/secret/train.jsonl", "format": "alpaca"}}}
    crud.transition(session=session, job_id=job_id, to=S.succeeded, run_token=running.run_token,
                    values={"result": result})
    check("succeeded, with a result")
    got = client.get(f"/jobs/{job_id}", headers=headers).json()
    assert got["status"] == "succeeded" and got["step"] == 2 and got["settings"] == settings
    assert "loss_history" not in got["result"] and got["result"]["resolved_spec"]["data"]["path"] is None
    assert len(stages) == 6


def test_a_failed_job_shows_its_error(client, session, auth, dataset_id):
    job_id = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    polled(client, auth[1], job_id)
    running = crud.claim_job(session=session, job_id=job_id, worker="w1")
    crud.transition(session=session, job_id=job_id, to=S.failed, run_token=running.run_token,
                    values={"error": {"code": "oom_ladder_exhausted", "message": "no rung fits"}})
    body = polled(client, auth[1], job_id)
    assert body == orm_json(session, job_id)
    assert client.get(f"/jobs/{job_id}", headers=auth[1]).json()["error"]["code"] == "oom_ladder_exhausted"


def test_another_tenants_job_is_404_even_while_remembered(client, session, auth, dataset_id):
    job_id = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    polled(client, auth[1], job_id)  # its body is now in the memo
    _, other = new_tenant(session)
    for _ in range(2):
        r = client.get(f"/jobs/{job_id}", headers=other)
        assert r.status_code == 404 and r.json()["error"] == {
            "code": "not_found", "message": f"no job {job_id!r}", "param": "job_id", "type": "invalid_request_error"}
    assert client.get("/jobs/ftjob-doesnotexist", headers=auth[1]).status_code == 404


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"), ({"Authorization": "Basic abc"}, "missing_api_key"),
    ({"Authorization": "Bearer"}, "missing_api_key"), ({"Authorization": "Bearer   "}, "missing_api_key"),
    ({"Authorization": "Bearer trn_wrong"}, "invalid_api_key"),
])
def test_the_poll_checks_the_key_as_every_route_does(client, auth, dataset_id, headers, code):
    """The route reads the header itself (not through get_tenant): the same answers as GET /jobs."""
    job_id = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    polled(client, auth[1], job_id)
    for path in (f"/jobs/{job_id}", "/jobs"):
        r = client.get(path, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == code, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_is_refused_by_the_poll_at_once(settings, session, enqueued, redis_client, monkeypatch):
    """With a 600 s key cache, only the revocation's notification can drop the cached key."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from trinity_service.settings import get_settings

    monkeypatch.setenv("TRINITY_AUTH_CACHE_S", "600")
    get_settings.cache_clear()
    tenant, headers = new_tenant(session)
    with TestClient(create_app()) as client:
        hub, deadline = client.app.state.event_hub, time.monotonic() + 10
        while not hub.live:
            assert time.monotonic() < deadline, "the hub never subscribed to Redis"
            time.sleep(0.05)
        assert client.get("/jobs/ftjob-any", headers=headers).status_code == 404  # the key is cached now
        assert crud.revoke_api_key(session=session, key_id=crud.list_api_keys(session=session, tenant=tenant)[0].id)
        deadline = time.monotonic() + 5
        while (r := client.get("/jobs/ftjob-any", headers=headers)).status_code == 404:
            assert time.monotonic() < deadline, "a revoked key was still accepted 5 s after its revocation"
            time.sleep(0.02)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_the_poll_keeps_its_place_in_the_schema(client):
    operation = client.get("/openapi.json").json()["paths"]["/jobs/{job_id}"]["get"]
    assert operation["security"] == [{"HTTPBearer": []}]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobPublic"}
    assert {"401", "404"} <= set(operation["responses"])
    assert [p["name"] for p in operation["parameters"]] == ["job_id"]


def test_queue_position_counts_ties_by_id(session):
    """Row-value comparison (queued_at, id): jobs queued at the same instant are ordered by id, in
    both the ORM's count and the polled statement's."""
    queue = f"q-{time.time_ns()}"
    jobs = []
    for _ in range(4):
        job, _ = crud.create_job(session=session, tenant="t", spec={"data": {"hub": "x/y"}}, queue=queue,
                                 dataset_id=None, idempotency_key=None, body_hash="h")
        jobs.append(job.id)
    stamp = time.time()
    for job_id in jobs:
        crud.transition(session=session, job_id=job_id, to=S.queued, values={"queued_at": stamp})
    later, _ = crud.create_job(session=session, tenant="t", spec={"data": {"hub": "x/y"}}, queue=queue,
                               dataset_id=None, idempotency_key=None, body_hash="h")
    crud.transition(session=session, job_id=later.id, to=S.queued, values={"queued_at": stamp + 1})
    expected = {job_id: rank for rank, job_id in enumerate(sorted(jobs), start=1)} | {later.id: 5}
    with session.connection() as connection:
        for job_id, rank in expected.items():
            job = crud.get_job(session=session, tenant=None, job_id=job_id)
            assert crud.queue_position(session=session, job=job) == rank
            values = crud.job_row_values(connection=connection, tenant="t", job_id=job_id)
            assert crud.job_row_fields(values)[1] == rank
            assert crud.job_row_values(connection=connection, tenant="other", job_id=job_id) is None


def test_concurrent_misses_of_one_key_share_one_lookup(monkeypatch):
    from api import auth

    calls, gate = [], threading.Event()

    def slow_lookup(key: str) -> str | None:
        calls.append(key)
        gate.wait(5)
        return "acme" if key == "trn_good" else None

    monkeypatch.setattr(auth, "_lookup", slow_lookup)
    auth.forget()

    async def many() -> list[str | None]:
        waiting = [asyncio.create_task(auth.tenant_for("trn_good", 5.0)) for _ in range(50)]
        await asyncio.sleep(0.2)  # every one of them has missed the cache by now
        gate.set()
        return await asyncio.gather(*waiting)

    assert asyncio.run(many()) == ["acme"] * 50
    assert calls == ["trn_good"]
    assert asyncio.run(auth.tenant_for("trn_good", 5.0)) == "acme" and len(calls) == 1  # cached
    gate.clear()
    gate.set()
    assert asyncio.run(auth.tenant_for("trn_bad", 5.0)) is None
    assert asyncio.run(auth.tenant_for("trn_bad", 5.0)) is None and calls.count("trn_bad") == 2  # never cached
    auth.forget()


def test_livez_answers_without_a_key_or_a_database(client):
    r = client.get("/livez")
    assert r.status_code == 200 and r.content == b'{"status":"ok"}'
    assert r.headers["content-type"] == "application/json"
