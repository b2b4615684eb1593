"""Database operations: keyword-only, HTTP-free, each one transaction (they commit).

Status changes go through ``transition``: a compare-and-set UPDATE (``WHERE status = <read>``,
optionally fenced by ``run_token``) checked against ``states.TRANSITIONS``, with the status
event and the webhook deliveries it causes (``trinity_service.webhooks``, the outbox) written in the same
transaction. Event ``seq`` comes from ``job.last_seq`` bumped by an
``UPDATE ... RETURNING``, which also row-locks the job, so seq order is commit order per job.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import JSON, Connection, Text, and_, bindparam, cast, func, or_, tuple_, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from trinity_service import notify, webhooks
from trinity_service.models import ApiKey, Dataset, Job, JobEvent, JobOpenAI, JobPublic, now
from trinity_service.security import generate_key, hash_key, same_hash
from trinity_service.states import ACTIVE, IllegalTransition, JobStatus, can_transition, is_terminal

S = JobStatus
CAS_TRIES = 5


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used with another request body."""


# ── Keys ─────────────────────────────────────────────────────────────────────────────────────

def create_api_key(*, session: Session, tenant: str) -> tuple[ApiKey, str]:
    """Store a new key's hash; the plaintext is returned once and never stored."""
    key = generate_key()
    row = ApiKey(tenant=tenant, key_hash=hash_key(key), prefix=key[:12])
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, key


def authenticate(*, session: Session, key: str) -> str | None:
    """The tenant a key belongs to, or None (unknown or revoked)."""
    digest = hash_key(key)
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == digest)).first()
    if row is None or row.revoked_at is not None or not same_hash(row.key_hash, digest):
        return None
    return row.tenant


def list_api_keys(*, session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(col(ApiKey.id))
    if tenant:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.exec(query))


def revoke_api_key(*, session: Session, key_id: int) -> bool:
    """Revoke, then tell the API processes to drop the key from their caches (``api/auth.py``)."""
    res = session.execute(update(ApiKey).where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None))
                          .values(revoked_at=now()).returning(ApiKey.key_hash))
    key_hash = res.scalar_one_or_none()
    session.commit()
    if key_hash is not None:
        notify.key_revoked(key_hash)
    return key_hash is not None


# ── Datasets ─────────────────────────────────────────────────────────────────────────────────

def create_dataset(*, session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.commit()
    session.refresh(dataset)
    return dataset


def get_dataset(*, session: Session, tenant: str, dataset_id: str) -> Dataset | None:
    ds = session.get(Dataset, dataset_id)
    return ds if ds is not None and ds.tenant == tenant else None


def delete_dataset(*, session: Session, dataset: Dataset) -> bool:
    """Delete a dataset row that no job uses; False (nothing deleted) when a job refers to it."""
    if session.exec(select(Job.id).where(Job.dataset_id == dataset.id).limit(1)).first() is not None:
        return False
    uses_as_eval = select(Job.spec).where(Job.tenant == dataset.tenant)  # data.eval_dataset_id lives in the spec
    if any((spec.get("data") or {}).get("eval_dataset_id") == dataset.id for spec in session.exec(uses_as_eval)):
        return False
    session.delete(dataset)
    session.commit()
    return True


def list_datasets(*, session: Session, tenant: str, limit: int, after: str | None = None) -> tuple[list[Dataset], bool]:
    query = select(Dataset).where(Dataset.tenant == tenant)
    query = _after(session, query, Dataset, tenant, after)
    rows = list(session.exec(query.order_by(col(Dataset.created_at).desc(), col(Dataset.id).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _after(session: Session, query, table, tenant: str, after: str | None):  # noqa: ANN001, ANN202
    """Keyset pagination on (created_at desc, id desc) after the row ``after``."""
    if not after:
        return query
    cursor = session.get(table, after)
    if cursor is None or cursor.tenant != tenant:
        return query.where(False)
    return query.where(or_(col(table.created_at) < cursor.created_at,
                           and_(col(table.created_at) == cursor.created_at, col(table.id) < cursor.id)))


# ── Jobs ─────────────────────────────────────────────────────────────────────────────────────

def request_hash(body: Any, *extra: Any) -> str:
    """sha256 of the canonical JSON of a request (same meaning → same hash)."""
    canonical = json.dumps([body, *extra], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def create_job(
    *, session: Session, tenant: str, spec: dict[str, Any], queue: str, dataset_id: str | None,
    idempotency_key: str | None = None, body_hash: str | None = None, openai: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
) -> tuple[Job, bool]:
    """Insert a job in ``validating_files`` (with ``openai``: its ``JobOpenAI`` row, same transaction);
    ``routing``: why it goes to ``queue`` (``api/routing.py``).
    With an idempotency key, a repeat returns the first job (``created`` False); the same key with
    another body raises ``IdempotencyConflict``."""
    if idempotency_key:
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, body_hash), False
    job = Job(tenant=tenant, spec=spec, queue=queue, dataset_id=dataset_id, routing=routing,
              idempotency_key=idempotency_key, request_hash=body_hash)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the insert
        session.rollback()
        existing = _by_idempotency_key(session, tenant, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, body_hash), False
    if openai is not None:
        session.add(JobOpenAI(job_id=job.id, **openai))
    _append_event(session, job.id, type="status", message="job created; validating files",
                  data={"status": S.validating_files.value})
    session.commit()
    session.refresh(job)
    return job, True


def openai_extras(*, session: Session, job_ids: list[str]) -> dict[str, JobOpenAI]:
    """The ``JobOpenAI`` rows of these jobs (jobs created by ``POST /jobs`` have none)."""
    if not job_ids:
        return {}
    return {row.job_id: row for row in session.exec(select(JobOpenAI).where(col(JobOpenAI.job_id).in_(job_ids)))}


def _by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.exec(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)).first()


def _replay(existing: Job, body_hash: str | None) -> Job:
    if existing.request_hash != body_hash:
        raise IdempotencyConflict(existing.id)
    return existing


def get_job(*, session: Session, tenant: str | None, job_id: str) -> Job | None:
    """The job, or None when it does not exist or belongs to another tenant (tenant None: any)."""
    job = session.get(Job, job_id, populate_existing=True)
    return job if job is not None and (tenant is None or job.tenant == tenant) else None


# Columns GET /jobs/{id} answers with (JobPublic's fields that are columns of the job table).
_POLL_COLUMNS = tuple(c for c in Job.__table__.columns if c.name in JobPublic.model_fields)
_POLL_NAMES = (*(c.name for c in _POLL_COLUMNS), "ahead")
_POLL_JSON = tuple(c.name for c in _POLL_COLUMNS if isinstance(c.type, JSON))


def _job_row_statement():  # noqa: ANN202
    """Built once, in Core with bound parameters: SQLAlchemy then skips the ORM and reuses the
    compiled SQL (per call, building and hashing the statement cost more than running it). JSON
    columns come back as their stored text (``CAST … AS TEXT``): a poll of an unchanged row is
    then recognised by comparing plain values, before any JSON is parsed (``api/poll.py``)."""
    job, ahead = Job.__table__, Job.__table__.alias("ahead")
    position = select(func.count()).select_from(ahead).where(
        ahead.c.queue == job.c.queue, ahead.c.status == S.queued.value,
        tuple_(ahead.c.queued_at, ahead.c.id) < tuple_(job.c.queued_at, job.c.id),
    ).correlate(job).scalar_subquery()
    columns = [cast(c, Text).label(c.name) if c.name in _POLL_JSON else c for c in _POLL_COLUMNS]
    return select(*columns, position.label("ahead")).where(
        job.c.id == bindparam("job_id"), job.c.tenant == bindparam("tenant"))


_JOB_ROW = _job_row_statement()
# The same statement as SQLite's driver takes it (named parameters), for job_row_values on SQLite.
_JOB_ROW_SQLITE = _JOB_ROW.compile(dialect=sqlite.dialect(paramstyle="named"))
_JOB_ROW_SQLITE_SQL, _JOB_ROW_SQLITE_PARAMS = _JOB_ROW_SQLITE.string, dict(_JOB_ROW_SQLITE.params)


def job_row_values(*, connection: Connection, tenant: str, job_id: str) -> tuple | None:
    """The public columns of the job, JSON ones as text, then the number of queued jobs ahead of it
    (``job_row_fields`` decodes them); None when missing or another tenant's. One statement, no
    ORM object, no session: GET /jobs/{id} is polled. On SQLite the driver runs the SQL compiled
    once (SQLAlchemy's execute and result handling cost several times the read itself); on other
    databases Core runs it (its types then differ: ``bool``, ``JobStatus``; same decoded fields)."""
    if connection.dialect.name == "sqlite":
        params = _JOB_ROW_SQLITE_PARAMS | {"job_id": job_id, "tenant": tenant}
        return connection.connection.driver_connection.execute(_JOB_ROW_SQLITE_SQL, params).fetchone()
    row = connection.execute(_JOB_ROW, {"job_id": job_id, "tenant": tenant}).first()
    return None if row is None else tuple(row)


def job_row_fields(values: tuple) -> tuple[dict[str, Any], int | None]:
    """``job_row_values`` as the job's columns by name, as the ORM reads them, and its
    ``queue_position`` (None unless queued)."""
    fields = dict(zip(_POLL_NAMES, values, strict=True))
    for name in _POLL_JSON:
        fields[name] = None if fields[name] is None else json.loads(fields[name])
    fields["cancel_requested"] = bool(fields["cancel_requested"])
    ahead = fields.pop("ahead")
    position = ahead + 1 if fields["status"] == S.queued and fields["queued_at"] is not None else None
    return fields, position


def list_jobs(
    *, session: Session, tenant: str, limit: int, after: str | None = None, status: JobStatus | None = None,
) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.tenant == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    query = _after(session, query, Job, tenant, after)
    rows = list(session.exec(query.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def queue_position(*, session: Session, job: Job) -> int | None:
    """1 + the queued jobs of the same queue queued before it (ties: by id); None unless queued.
    A row-value comparison, ``(queued_at, id) < (…)``, as in the polled statement: on SQLite the
    index on (queue, status, queued_at) then bounds the count to the jobs ahead (EXPLAIN QUERY
    PLAN: ``queued_at<?``), where the ``OR`` of the two cases it replaces scanned the whole queue."""
    if job.status != S.queued or job.queued_at is None:
        return None
    ahead = session.exec(
        select(func.count()).select_from(Job).where(
            Job.queue == job.queue, Job.status == S.queued,
            tuple_(col(Job.queued_at), col(Job.id)) < tuple_(job.queued_at, job.id),
        )
    ).one()
    return int(ahead) + 1


def transition(
    *, session: Session, job_id: str, to: JobStatus, message: str | None = None, level: str = "info",
    run_token: int | None = None, only_from: set[JobStatus] | None = None, where: tuple = (),
    values: dict[str, Any] | None = None, event_data: dict[str, Any] | None = None,
) -> Job | None:
    """Move a job to ``to`` if the table allows it from its current status, atomically.

    ``run_token`` fences a worker that lost the job; ``only_from`` narrows the legal sources;
    ``where`` adds SQL conditions (e.g. a stale heartbeat). Returns the updated job, or None when
    the job does not exist, the fence or a condition fails. Raises ``IllegalTransition`` when the
    current status cannot move to ``to``.
    """
    to = JobStatus(to)
    for _ in range(CAS_TRIES):
        current = session.exec(select(Job.status).where(Job.id == job_id)).first()
        if current is None:
            return None
        current = JobStatus(current)
        if not can_transition(current, to) or (only_from is not None and current not in only_from):
            raise IllegalTransition(current, to)
        stamp = now()
        fields = {"status": to, **_timestamps(to, stamp), **(values or {})}
        conditions = [col(Job.id) == job_id, col(Job.status) == current, *where]
        if run_token is not None:
            conditions.append(col(Job.run_token) == run_token)
        res = session.execute(update(Job).where(*conditions).values(**fields))
        if res.rowcount == 1:
            _append_event(session, job_id, level=level, type="status",
                          message=message or f"{current.value} -> {to.value}",
                          data={"status": to.value, "previous": current.value, **(event_data or {})})
            tenant = session.exec(select(Job.tenant).where(Job.id == job_id)).one()
            error = (values or {}).get("error")
            webhooks.enqueue(session, job_id=job_id, tenant=tenant, status=to.value, previous=current.value,
                             data={"error": error} if isinstance(error, dict) else None)
            session.commit()  # the status, its event and its webhook deliveries (the outbox) together
            notify.event_committed(job_id, None)
            return get_job(session=session, tenant=None, job_id=job_id)
        session.rollback()
        if run_token is not None or where:
            # The fence or a condition failed (or the status moved): re-check only the status race.
            row = session.exec(select(Job.status, Job.run_token).where(Job.id == job_id)).first()
            if row is None or row[0] == current:
                return None
    return None


def _timestamps(to: JobStatus, stamp: float) -> dict[str, float]:
    if to == S.queued:
        return {"queued_at": stamp}
    if to in (S.succeeded, S.failed, S.cancelled):
        return {"finished_at": stamp}
    return {}


def claim_job(*, session: Session, job_id: str, worker: str) -> Job | None:
    """The atomic claim a task makes before running: queued → running, bumping ``run_token``.

    Only one of several deliveries of the same job wins; the others (and deliveries for
    cancelled or finished jobs) get None and do nothing.
    """
    job = session.get(Job, job_id)
    if job is None or job.status != S.queued or job.cancel_requested:
        return None
    stamp = now()
    values = {"run_token": Job.run_token + 1, "worker": worker, "heartbeat_at": stamp,
              "started_at": func.coalesce(Job.started_at, stamp)}
    try:
        return transition(session=session, job_id=job_id, to=S.running, only_from={S.queued},
                          where=(col(Job.cancel_requested).is_(False),), values=values,
                          message=f"running on {worker}", event_data={"worker": worker})
    except IllegalTransition:
        return None


def request_cancel(*, session: Session, job: Job) -> Job:
    """Queued (or validating) jobs are cancelled at once and never start; a running job is
    flagged ``cancelling`` and stops at its next step boundary. Raises ``IllegalTransition``
    for a finished job."""
    for _ in range(CAS_TRIES):
        job = get_job(session=session, tenant=None, job_id=job.id)
        if job.status == S.cancelling:
            return job
        try:
            if job.status in (S.queued, S.validating_files):
                done = transition(session=session, job_id=job.id, to=S.cancelled, only_from={job.status},
                                  values={"cancel_requested": True}, message="cancelled before it started")
            else:
                done = transition(session=session, job_id=job.id, to=S.cancelling, only_from={job.status},
                                  values={"cancel_requested": True},
                                  message="cancel requested; stopping at the next step boundary")
        except IllegalTransition:
            if is_terminal(job.status):
                raise
            continue  # the status moved under us (e.g. queued -> running): look again
        if done is not None:
            return done
    raise IllegalTransition(job.status, S.cancelled)


def mark_enqueued(*, session: Session, job_id: str, task_id: str) -> None:
    session.execute(update(Job).where(col(Job.id) == job_id).values(task_id=task_id, enqueued_at=now()))
    session.commit()


def heartbeat(*, session: Session, job_id: str, run_token: int, **progress: Any) -> bool:
    """Touch the row (and any progress fields). False when this run no longer owns the job."""
    res = session.execute(
        update(Job).where(col(Job.id) == job_id, col(Job.run_token) == run_token,
                          col(Job.status).in_(list(ACTIVE)))
        .values(heartbeat_at=now(), **progress)
    )
    session.commit()
    return res.rowcount == 1


def stop_requested(*, session: Session, job_id: str, run_token: int) -> bool:
    """True when the job was cancelled or another run took it over."""
    row = session.exec(select(Job.cancel_requested, Job.run_token, Job.status).where(Job.id == job_id)).first()
    return row is None or row[0] or row[1] != run_token or JobStatus(row[2]) not in ACTIVE


# ── Events ───────────────────────────────────────────────────────────────────────────────────

def _append_event(session: Session, job_id: str, *, type: str, message: str, level: str = "info",
                  data: dict[str, Any] | None = None, time: float | None = None) -> int:
    seq = session.execute(
        update(Job).where(col(Job.id) == job_id).values(last_seq=Job.last_seq + 1).returning(Job.last_seq)
    ).scalar_one()
    session.add(JobEvent(job_id=job_id, seq=seq, time=time or now(), level=level, type=type,
                         message=message, data=data or {}))
    return seq


def record_event(
    *, session: Session, job_id: str, run_token: int, type: str, message: str, level: str = "info",
    data: dict[str, Any] | None = None, time: float | None = None, progress: dict[str, Any] | None = None,
) -> int | None:
    """Append an event from a run (and update progress fields) in one transaction.
    Returns the seq, or None when the run no longer owns the job (its write is dropped)."""
    res = session.execute(
        update(Job).where(col(Job.id) == job_id, col(Job.run_token) == run_token,
                          col(Job.status).in_(list(ACTIVE)))
        .values(heartbeat_at=now(), **(progress or {}))
    )
    if res.rowcount != 1:
        session.rollback()
        return None
    seq = _append_event(session, job_id, type=type, message=message, level=level, data=data, time=time)
    session.commit()
    notify.event_committed(job_id, seq)  # after the commit: a follower woken by it can read the row
    return seq


def add_event(*, session: Session, job_id: str, type: str, message: str, level: str = "info",
              data: dict[str, Any] | None = None) -> int:
    """Append a service event (reaper, API) to any job."""
    seq = _append_event(session, job_id, type=type, message=message, level=level, data=data)
    session.commit()
    notify.event_committed(job_id, seq)
    return seq


def list_events(
    *, session: Session, job_id: str, after: int = 0, limit: int = 100,
    levels: list[str] | None = None, types: list[str] | None = None, before: int | None = None,
    newest_first: bool = False,
) -> tuple[list[JobEvent], bool]:
    """Events with ``after < seq < before``, oldest first (or newest first); ``(page, has_more)``."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, col(JobEvent.seq) > after)
    if before is not None:
        query = query.where(col(JobEvent.seq) < before)
    if levels:
        query = query.where(col(JobEvent.level).in_(levels))
    if types:
        query = query.where(col(JobEvent.type).in_(types))
    order = col(JobEvent.seq).desc() if newest_first else col(JobEvent.seq)
    rows = list(session.exec(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# ── Reaper queries ───────────────────────────────────────────────────────────────────────────

def stale_jobs(*, session: Session, heartbeat_before: float) -> list[Job]:
    """Jobs a worker holds (running/cancelling) whose heartbeat stopped."""
    return list(session.exec(select(Job).where(
        col(Job.status).in_(list(ACTIVE)),
        or_(col(Job.heartbeat_at).is_(None), col(Job.heartbeat_at) < heartbeat_before),
    )))


def unsent_candidates(*, session: Session, enqueued_before: float) -> list[Job]:
    """Queued jobs last sent before the cutoff (their message may be lost)."""
    return list(session.exec(select(Job).where(
        Job.status == S.queued, func.coalesce(Job.enqueued_at, Job.queued_at) < enqueued_before,
    ).order_by(col(Job.queued_at))))


def stuck_validating(*, session: Session, created_before: float) -> list[Job]:
    """Jobs left in validating_files by an API process that died mid-request."""
    return list(session.exec(select(Job).where(
        Job.status == S.validating_files, col(Job.created_at) < created_before)))


def requeue_lost(*, session: Session, job: Job, heartbeat_before: float, max_resumes: int) -> Job | None:
    """A worker died holding ``job``: re-queue it to resume from its checkpoint (running), end it
    (cancelling → cancelled), or fail it after too many resumes. Fenced by run_token and the stale
    heartbeat, so a job whose worker just came back is left alone."""
    fence = dict(run_token=job.run_token, where=(
        or_(col(Job.heartbeat_at).is_(None), col(Job.heartbeat_at) < heartbeat_before),))
    silent = f"worker {job.worker or '?'} lost (no heartbeat since {job.heartbeat_at or 0:.0f})"
    try:
        if job.status == S.cancelling:
            return transition(session=session, job_id=job.id, to=S.cancelled, level="warning", **fence,
                              message=f"{silent}; cancelled")
        if job.resumes >= max_resumes:
            error = {"code": "worker_lost", "message": f"{silent}; gave up after {job.resumes} resumes"}
            return transition(session=session, job_id=job.id, to=S.failed, level="error", **fence,
                              values={"error": error}, message=error["message"], event_data={"error": error})
        return transition(session=session, job_id=job.id, to=S.queued, level="warning", **fence,
                          values={"resumes": Job.resumes + 1, "task_id": None, "enqueued_at": None},
                          message=f"{silent}; re-queued to resume from its last checkpoint")
    except IllegalTransition:
        return None
