"""The body of GET /jobs/{id}, the route clients poll (issue 20: ≥ 2,000 polls/s on 2 cores).

A poll reads the job's public columns in one statement (``crud.job_row_values``: JSON columns as
their stored text), then answers with the bytes built for exactly those values the last time,
when they are equal: a job's public JSON is a function of its row (and its queue position, which
the row read includes), so an unchanged row needs no JSON parsing, no pydantic validation and no
serialisation. Any change to a column the answer shows (status, step, heartbeat, queue position…)
makes the values differ, and the body is built again by ``JobPublic``, the one serialiser.

Ownership is checked by the read itself (``WHERE tenant = …``): another tenant's job is None
before the memo is consulted, so the memo can never answer for a job the caller may not see.
"""

from __future__ import annotations

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from trinity_service import crud
from trinity_service.db import get_engine, loop_reader
from trinity_service.models import JobPublic

# job id → (row values, body). The body is a function of the values alone, so a hit is right
# whatever database or app the values came from; the id only picks the entry to compare with.
MAX_BODIES = 4096  # a bound on memory (~4 kB an entry), not a tuning knob
_bodies: dict[str, tuple[tuple, bytes]] = {}


async def job_json(tenant: str, job_id: str) -> bytes | None:
    """The job's public JSON, or None when it is missing or another tenant's. On SQLite (WAL: a
    reader never waits for a writer) the read takes less time than a hop to a thread and back, so it
    runs on the event loop; a networked database is read in the threadpool."""
    reader = loop_reader()
    if reader is not None:
        return public_json(reader, tenant, job_id)
    return await run_in_threadpool(_read_in_thread, tenant, job_id)


def public_json(connection: Connection, tenant: str, job_id: str) -> bytes | None:
    values = crud.job_row_values(connection=connection, tenant=tenant, job_id=job_id)
    if values is None:
        return None
    known = _bodies.get(job_id)
    if known is not None and known[0] == values:
        return known[1]
    fields, position = crud.job_row_fields(values)
    body = JobPublic.of_row(fields, queue_position=position).model_dump_json().encode()
    if len(_bodies) >= MAX_BODIES:
        _bodies.clear()
    _bodies[job_id] = (values, body)
    return body


def _read_in_thread(tenant: str, job_id: str) -> bytes | None:
    with get_engine().connect() as connection:
        return public_json(connection, tenant, job_id)
