"""GET /jobs/{id}/events (cursor-paginated by seq) and GET /jobs/{id}/events/stream (SSE).

Each event has the job's monotonic ``seq``, so resuming is ``seq > n``: the stream sends
``id: <seq>``, and a client that reconnects with ``Last-Event-ID`` (header, or the
``last_event_id`` query parameter) gets exactly the events it missed. The stream ends, with a
final ``event: end``, once the job is terminal and every event has been sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import crud
from api.db import session_scope
from api.deps import JobDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.models import EventList, EventPublic, JobEvent
from api.states import is_terminal

router = APIRouter(prefix="/jobs/{job_id}/events", tags=["events"])

Level = Literal["info", "warning", "error"]
Kind = Literal["message", "metrics", "eval", "status"]
LevelQuery = Annotated[list[Level] | None, Query(description="Only these levels (repeatable)")]
TypeQuery = Annotated[list[Kind] | None, Query(description="Only these types (repeatable)")]
PAGE = 500
MAX_SEQ = 2**63 - 1  # a BIGINT: larger cursors overflowed the database driver (500; found by schemathesis)
KEEPALIVE_S = 15.0


def _public(event: JobEvent) -> EventPublic:
    return EventPublic.model_validate(event, from_attributes=True)


@router.get("", response_model=EventList)
def list_events(
    session: SessionDep, job: JobDep, level: LevelQuery = None, type: TypeQuery = None,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="Return events with seq > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):
    events, more = crud.list_events(session=session, job_id=job.id, after=after, limit=limit, levels=level, types=type)
    return EventList(data=[_public(e) for e in events], has_more=more, last_seq=events[-1].seq if events else None)


@router.get("/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
def stream_events(
    session: SessionDep, job: JobDep, settings: SettingsDep, level: LevelQuery = None, type: TypeQuery = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[str | None, Query(description="Same as the Last-Event-ID header")] = None,
):
    raw = last_event_id_header or last_event_id or "0"
    if not raw.strip().isdigit() or int(raw) > MAX_SEQ:
        raise ApiError(422, "invalid_request", "Last-Event-ID must be an event seq (an integer)",
                       param="Last-Event-ID")
    job_id = job.id
    session.close()  # a stream may last hours: hold no connection between polls
    return StreamingResponse(
        _stream(job_id, int(raw), level, type, settings.sse_poll_s), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(job_id: str, after: int, levels, types, poll_s: float) -> AsyncIterator[str]:  # noqa: ANN001
    yield "retry: 2000\n\n"
    quiet = 0.0
    while True:
        status, events, more = await run_in_threadpool(_poll, job_id, after, levels, types)
        for event in events:
            after = event.seq
            yield f"id: {event.seq}\ndata: {json.dumps(_public(event).model_dump(), separators=(',', ':'))}\n\n"
        if status is None or (is_terminal(status) and not more):
            yield f"event: end\ndata: {json.dumps({'status': getattr(status, 'value', status)})}\n\n"
            return
        if events:
            quiet = 0.0
            continue
        await asyncio.sleep(poll_s)
        quiet += poll_s
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"


def _poll(job_id: str, after: int, levels, types):  # noqa: ANN001, ANN202
    """Read the status first: if it is terminal, its final event is already committed."""
    with session_scope() as session:
        job = crud.get_job(session=session, tenant=None, job_id=job_id)
        status = job.status if job else None
        events, more = crud.list_events(session=session, job_id=job_id, after=after, limit=PAGE,
                                        levels=levels, types=types)
        for event in events:
            session.expunge(event)
        return status, events, more
