"""SSE fan-out: one Redis subscriber per API process, one shared reader per followed job.

Whoever commits an event publishes ``{"job", "seq"}`` on ``notify.EVENTS`` (``trinity_service/
notify.py``). The hub's single subscriber task wakes the job's ``Feed``, which reads the new events
once (one query, unfiltered, in the threadpool) into a small buffer and ticks; every follower of
that job then filters and sends from the buffer (``api/routes/events.py``). Followers hold no
thread and run no query of their own except to catch up on what precedes the buffer.

Without notifications (no Redis, or it went down) each feed reads every ``sse_poll_s`` instead, and
with them still every ``sse_fallback_poll_s``, in case one was lost. Key revocations arrive on the
same connection and are dropped from ``api/auth.py``'s cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from api import auth
from trinity_service import crud, notify
from trinity_service.db import session_scope
from trinity_service.models import EventPublic
from trinity_service.settings import Settings

log = logging.getLogger("trinity.events")
PAGE = 500
KEEP = 1000  # events a feed keeps for its followers; one further behind reads the database itself
RECONNECT_S = 2.0


@dataclass(frozen=True)
class Item:
    """One committed event, serialised once for every follower."""

    seq: int
    level: str
    type: str
    sse: str  # "id: <seq>\ndata: <json>\n\n"


def sse_event(event) -> str:  # noqa: ANN001  (a JobEvent)
    data = EventPublic.model_validate(event, from_attributes=True).model_dump()
    return f"id: {event.seq}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def read_job(job_id: str, after: int | None) -> tuple[object, int, list[Item]]:
    """(status, last_seq, every event with seq > after) — the status and ``last_seq`` read first, so
    a terminal status's final event and every event up to ``last_seq`` are in the list."""
    with session_scope() as session:
        job = crud.get_job(session=session, tenant=None, job_id=job_id)
        if job is None:
            return None, 0, []
        status, last_seq, items = job.status, job.last_seq, []
        while after is not None:
            events, more = crud.list_events(session=session, job_id=job_id, after=after, limit=PAGE)
            items += [Item(e.seq, e.level, e.type, sse_event(e)) for e in events]
            if not more:
                break
            after = events[-1].seq
        return status, last_seq, items


class Feed:
    """The events of one job that its followers in this process have not all sent yet.

    ``items`` hold every event with ``lo < seq <= seen``; ``tick`` is set (and replaced) whenever
    ``items`` or ``status`` change. Reads are single-flight: one per wake-up, whatever the number
    of followers."""

    def __init__(self, hub: EventHub, job_id: str):
        self.hub, self.job_id = hub, job_id
        self.status = None
        self.lo = self.seen = 0
        self.items: list[Item] = []
        self.tick = asyncio.Event()
        self.ready = asyncio.Event()
        self.followers = 0
        self._poked = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    def poke(self, seq: int | None = None) -> None:
        if seq is None or seq > self.seen:
            self._poked.set()

    def snapshot(self, after: int) -> tuple[list[Item], int, object]:
        """Items with seq > after, the seq they reach, and the status read with them."""
        return [i for i in self.items if i.seq > after], self.seen, self.status

    async def _run(self) -> None:
        try:
            self.status, self.seen, _ = await run_in_threadpool(read_job, self.job_id, None)
            self.lo = self.seen
        finally:
            self.ready.set()
        while True:
            try:
                await asyncio.wait_for(self._poked.wait(), self.hub.poll_interval())
            except TimeoutError:
                pass
            self._poked.clear()
            try:
                status, last_seq, items = await run_in_threadpool(read_job, self.job_id, self.seen)
            except Exception:  # noqa: BLE001  (a database hiccup: try again on the next wake-up)
                log.exception("reading events of %s", self.job_id)
                continue
            self.hub.reads += 1
            if not items and status == self.status and last_seq <= self.seen:
                continue
            self.status = status
            self.items += items
            self.seen = max(self.seen, last_seq, items[-1].seq if items else 0)
            if len(self.items) > KEEP:
                self.lo = self.items[-KEEP - 1].seq
                del self.items[:-KEEP]
            tick, self.tick = self.tick, asyncio.Event()
            tick.set()

    def close(self) -> None:
        self._task.cancel()


class EventHub:
    """Feeds by job id, and the one Redis subscriber that wakes them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.feeds: dict[str, Feed] = {}
        self.live = False  # subscribed to Redis right now
        self.reads = 0  # feed reads (for the benchmark's query count)
        self._task: asyncio.Task | None = None

    def poll_interval(self) -> float:
        return self.settings.sse_fallback_poll_s if self.live else self.settings.sse_poll_s

    async def start(self) -> None:
        if self.settings.notify_redis_url:
            self._task = asyncio.create_task(self._listen(self.settings.notify_redis_url))

    async def stop(self) -> None:
        for feed in self.feeds.values():
            feed.close()
        self.feeds.clear()
        if self._task:
            self._task.cancel()

    @asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[Feed]:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(self, job_id)
        feed.followers += 1
        try:
            await feed.ready.wait()
            yield feed
        finally:
            feed.followers -= 1
            if feed.followers == 0 and self.feeds.get(job_id) is feed:
                del self.feeds[job_id]
                feed.close()

    def _wake_all(self) -> None:
        for feed in self.feeds.values():
            feed.poke()

    async def _listen(self, url: str) -> None:
        import redis.asyncio as aioredis

        while True:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=2)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(notify.EVENTS, notify.KEYS)
                    self.live = True
                    auth.forget()  # revocations sent while we were not listening are lost
                    self._wake_all()  # and so are event notifications
                    async for message in pubsub.listen():
                        self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001  (Redis down: poll until it is back)
                if self.live:
                    log.warning("event notifications lost (%s); polling every %.1f s", error,
                                self.settings.sse_poll_s)
            finally:
                self.live = False
                await client.aclose()
            self._wake_all()  # re-read now, then at the faster interval
            await asyncio.sleep(RECONNECT_S)

    def _dispatch(self, message: dict) -> None:
        try:
            body = json.loads(message["data"])
            if message["channel"] in (notify.EVENTS, notify.EVENTS.encode()):
                feed = self.feeds.get(body["job"])
                if feed is not None:
                    feed.poke(body.get("seq"))
            else:
                auth.forget(body["key_hash"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed notification: %r", message.get("data"))
