"""DB-level behaviour, on SQLite and PostgreSQL: transitions, the claim, event seq, fencing,
idempotency, keys and the reaper's queries."""

from __future__ import annotations

import threading
import time

import pytest

from trinity_service import crud
from trinity_service.db import session_scope
from trinity_service.models import ApiKey, Job
from trinity_service.security import hash_key
from trinity_service.states import IllegalTransition, JobStatus as S


def make_job(session, *, tenant="t", queue="q", status=S.queued, key=None) -> Job:
    job, created = crud.create_job(session=session, tenant=tenant, spec={"data": {"hub": "x/y"}}, queue=queue,
                                   dataset_id=None, idempotency_key=key, body_hash="h")
    assert created
    if status != S.validating_files:
        crud.transition(session=session, job_id=job.id, to=S.queued)
    if status in (S.running, S.cancelling):
        crud.claim_job(session=session, job_id=job.id, worker="w1")
    if status == S.cancelling:
        crud.request_cancel(session=session, job=job)
    return crud.get_job(session=session, tenant=None, job_id=job.id)


def statuses(session, job_id):
    events, _ = crud.list_events(session=session, job_id=job_id, types=["status"], limit=1000)
    return [e.data["status"] for e in events]


def test_keys_are_stored_hashed_and_revocable(session):
    row, key = crud.create_api_key(session=session, tenant="acme")
    assert key.startswith("trn_") and len(key) > 40
    stored = session.get(ApiKey, row.id)
    assert stored.key_hash == hash_key(key) and key not in stored.key_hash
    assert crud.authenticate(session=session, key=key) == "acme"
    assert crud.authenticate(session=session, key=key + "x") is None
    assert crud.revoke_api_key(session=session, key_id=row.id)
    assert crud.authenticate(session=session, key=key) is None


def test_transitions_follow_the_table_and_are_recorded(session):
    job = make_job(session, status=S.validating_files)
    with pytest.raises(IllegalTransition):
        crud.transition(session=session, job_id=job.id, to=S.running)  # not queued yet
    crud.transition(session=session, job_id=job.id, to=S.queued)
    claimed = crud.claim_job(session=session, job_id=job.id, worker="w1")
    assert claimed.status == S.running and claimed.run_token == 1 and claimed.started_at
    done = crud.transition(session=session, job_id=job.id, to=S.succeeded, run_token=1)
    assert done.status == S.succeeded and done.finished_at
    with pytest.raises(IllegalTransition):
        crud.transition(session=session, job_id=job.id, to=S.failed)
    assert statuses(session, job.id) == ["validating_files", "queued", "running", "succeeded"]
    events, _ = crud.list_events(session=session, job_id=job.id)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[2].data == {"status": "running", "previous": "queued", "worker": "w1"}


def test_only_one_claim_wins_under_concurrency(settings):
    with session_scope() as s:
        job = make_job(s)
    winners, barrier = [], threading.Barrier(6)

    def claim(i):
        with session_scope() as s:
            barrier.wait()
            if crud.claim_job(session=s, job_id=job.id, worker=f"w{i}") is not None:
                winners.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(winners) == 1
    with session_scope() as s:
        assert statuses(s, job.id).count("running") == 1


def test_event_seq_is_gapless_under_concurrent_writers(settings):
    with session_scope() as s:
        job = make_job(s, status=S.running)

    def write(i):
        for n in range(10):
            with session_scope() as s:
                assert crud.record_event(session=s, job_id=job.id, run_token=1, type="message",
                                         message=f"{i}-{n}") is not None

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    with session_scope() as s:
        events, _ = crud.list_events(session=s, job_id=job.id, limit=1000)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert len(events) == 3 + 40  # created, queued, running + 40
        assert crud.get_job(session=s, tenant=None, job_id=job.id).last_seq == 43


def test_a_run_that_lost_the_job_is_fenced(session):
    job = make_job(session, status=S.running)
    assert crud.heartbeat(session=session, job_id=job.id, run_token=1, step=3)
    # the reaper re-queues it and another worker claims it: run_token 2
    requeued = crud.requeue_lost(session=session, job=crud.get_job(session=session, tenant=None, job_id=job.id),
                                 heartbeat_before=time.time() + 1, max_resumes=3)
    assert requeued.status == S.queued and requeued.resumes == 1
    assert crud.claim_job(session=session, job_id=job.id, worker="w2").run_token == 2
    # the old run's writes are dropped, its stop flag is up, its ending is ignored
    assert not crud.heartbeat(session=session, job_id=job.id, run_token=1)
    assert crud.record_event(session=session, job_id=job.id, run_token=1, type="message", message="zombie") is None
    assert crud.stop_requested(session=session, job_id=job.id, run_token=1)
    assert not crud.stop_requested(session=session, job_id=job.id, run_token=2)
    assert crud.transition(session=session, job_id=job.id, to=S.succeeded, run_token=1) is None
    assert crud.get_job(session=session, tenant=None, job_id=job.id).status == S.running


def test_cancel_queued_running_and_finished(session):
    queued = make_job(session)
    assert crud.request_cancel(session=session, job=queued).status == S.cancelled
    assert crud.claim_job(session=session, job_id=queued.id, worker="w") is None  # never starts

    running = make_job(session, status=S.running)
    flagged = crud.request_cancel(session=session, job=running)
    assert flagged.status == S.cancelling and flagged.cancel_requested
    assert crud.stop_requested(session=session, job_id=running.id, run_token=1)
    assert crud.request_cancel(session=session, job=running).status == S.cancelling  # idempotent
    assert crud.transition(session=session, job_id=running.id, to=S.cancelled, run_token=1).status == S.cancelled
    with pytest.raises(IllegalTransition):
        crud.request_cancel(session=session, job=running)


def test_idempotency_key(session):
    a, created = crud.create_job(session=session, tenant="t1", spec={"x": 1}, queue="q", dataset_id=None,
                                 idempotency_key="k", body_hash=crud.request_hash({"x": 1}, "q"))
    b, again = crud.create_job(session=session, tenant="t1", spec={"x": 1}, queue="q", dataset_id=None,
                               idempotency_key="k", body_hash=crud.request_hash({"x": 1}, "q"))
    assert created and not again and a.id == b.id
    with pytest.raises(crud.IdempotencyConflict):
        crud.create_job(session=session, tenant="t1", spec={"x": 2}, queue="q", dataset_id=None,
                        idempotency_key="k", body_hash=crud.request_hash({"x": 2}, "q"))
    other, created = crud.create_job(session=session, tenant="t2", spec={"x": 1}, queue="q", dataset_id=None,
                                     idempotency_key="k", body_hash=crud.request_hash({"x": 1}, "q"))
    assert created and other.id != a.id  # keys are per tenant
    assert crud.request_hash({"a": 1, "b": 2}) == crud.request_hash({"b": 2, "a": 1})


def test_queue_position(session):
    queue = f"q-{time.time_ns()}"
    jobs = [make_job(session, queue=queue) for _ in range(3)]
    assert [crud.queue_position(session=session, job=j) for j in jobs] == [1, 2, 3]
    crud.claim_job(session=session, job_id=jobs[0].id, worker="w")
    fresh = [crud.get_job(session=session, tenant=None, job_id=j.id) for j in jobs]
    assert [crud.queue_position(session=session, job=j) for j in fresh] == [None, 1, 2]


def test_list_jobs_pages_and_filters(session):
    tenant = f"t-{time.time_ns()}"
    ids = [make_job(session, tenant=tenant).id for _ in range(5)]
    crud.request_cancel(session=session, job=crud.get_job(session=session, tenant=None, job_id=ids[0]))
    page1, more = crud.list_jobs(session=session, tenant=tenant, limit=2)
    page2, more2 = crud.list_jobs(session=session, tenant=tenant, limit=2, after=page1[-1].id)
    page3, more3 = crud.list_jobs(session=session, tenant=tenant, limit=2, after=page2[-1].id)
    assert (more, more2, more3) == (True, True, False)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1]
    cancelled, _ = crud.list_jobs(session=session, tenant=tenant, limit=10, status=S.cancelled)
    assert [j.id for j in cancelled] == [ids[0]]
    assert crud.list_jobs(session=session, tenant="nobody", limit=10)[0] == []


def test_reaper_queries(session):
    now = time.time()
    stale = make_job(session, status=S.running)
    fresh = make_job(session, status=S.running)
    crud.heartbeat(session=session, job_id=fresh.id, run_token=1)
    session.execute(Job.__table__.update().where(Job.id == stale.id).values(heartbeat_at=now - 100))
    session.commit()
    found = {j.id for j in crud.stale_jobs(session=session, heartbeat_before=now - 10)}
    assert stale.id in found and fresh.id not in found

    # a stale cancelling job ends cancelled; one past max_resumes fails with worker_lost
    cancelling = make_job(session, status=S.cancelling)
    session.execute(Job.__table__.update().where(Job.id == cancelling.id).values(heartbeat_at=now - 100))
    session.commit()
    job = crud.get_job(session=session, tenant=None, job_id=cancelling.id)
    assert crud.requeue_lost(session=session, job=job, heartbeat_before=now - 10, max_resumes=3).status == S.cancelled
    job = crud.get_job(session=session, tenant=None, job_id=stale.id)
    failed = crud.requeue_lost(session=session, job=job, heartbeat_before=now - 10, max_resumes=0)
    assert failed.status == S.failed and failed.error["code"] == "worker_lost"
    # a heartbeat that arrived after the query keeps the job (fence on the stale heartbeat)
    job = crud.get_job(session=session, tenant=None, job_id=fresh.id)
    assert crud.requeue_lost(session=session, job=job, heartbeat_before=now - 10, max_resumes=3) is None

    waiting = make_job(session)
    assert waiting.id not in {j.id for j in crud.unsent_candidates(session=session, enqueued_before=now - 10)}
    assert waiting.id in {j.id for j in crud.unsent_candidates(session=session, enqueued_before=now + 10)}
