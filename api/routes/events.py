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
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from trinity_service import crud
from trinity_service.db import session_scope
from api.deps import JobDep, SessionDep
from api.event_hub import EventHub, sse_event
from api.errors import ApiError
from trinity_service.models import EventList, EventPublic, JobEvent
from trinity_core.events import Kind, Level  # the event shape's own lists (ladder included)
from trinity_service.states import is_terminal

router = APIRouter(prefix="/jobs/{job_id}/events", tags=["events"])

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
    request: Request, session: SessionDep, job: JobDep, level: LevelQuery = None, type: TypeQuery = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[str | None, Query(description="Same as the Last-Event-ID header")] = None,
):
    raw = last_event_id_header or last_event_id or "0"
    if not raw.strip().isdigit() or int(raw) > MAX_SEQ:
        raise ApiError(422, "invalid_request", "Last-Event-ID must be an event seq (an integer)",
                       param="Last-Event-ID")
    job_id = job.id
    session.close()  # a stream may last hours: hold no connection
    return StreamingResponse(
        _stream(request.app.state.event_hub, job_id, int(raw), level, type), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(hub: EventHub, job_id: str, after: int, levels, types) -> AsyncIterator[str]:  # noqa: ANN001
    """``seen``: every event up to it was sent or filtered out. Behind the job's shared feed, the
    follower reads its own pages from the database (a replay); then it sends from the feed."""
    yield "retry: 2000\n\n"
    seen = after
    async with hub.follow(job_id) as feed:
        while True:
            tick = feed.tick
            if seen < feed.lo:
                status, events, more, last_seq = await run_in_threadpool(_poll, job_id, seen, levels, types)
                for event in events:
                    yield sse_event(event)
                seen = events[-1].seq if more else max(seen, last_seq, events[-1].seq if events else 0)
                if status is None or (is_terminal(status) and not more):
                    break
                continue
            items, upto, status = feed.snapshot(seen)
            for item in items:
                if (not levels or item.level in levels) and (not types or item.type in types):
                    yield item.sse
            seen = max(seen, upto)
            if status is None or is_terminal(status):
                break
            try:
                await asyncio.wait_for(tick.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
    yield f"event: end\ndata: {json.dumps({'status': getattr(status, 'value', status)})}\n\n"


def _poll(job_id: str, after: int, levels, types):  # noqa: ANN001, ANN202
    """Read the status (and ``last_seq``) first: if it is terminal, its final event is already committed."""
    with session_scope() as session:
        job = crud.get_job(session=session, tenant=None, job_id=job_id)
        status, last_seq = (job.status, job.last_seq) if job else (None, 0)
        events, more = crud.list_events(session=session, job_id=job_id, after=after, limit=PAGE,
                                        levels=levels, types=types)
        for event in events:
            session.expunge(event)
        return status, events, more, last_seq
