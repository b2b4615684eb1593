"""Small notifications on Redis pub/sub after a commit: "job J has events up to seq N" and "key K
was revoked". They only wake readers up; the database stays the truth (a reader that misses one
reads on its slow fallback poll), so publishing is best effort and never fails a commit.

Each API process runs one subscriber (``api/event_hub.py``) for all its SSE followers.
"""

from __future__ import annotations

import json
import logging
import os
import time

from trinity_service.settings import get_settings

EVENTS = "trinity.events"  # {"job": id, "seq": n}
KEYS = "trinity.keys"  # {"key_hash": sha256 hex}
RETRY_AFTER_S = 30.0  # after a failed publish, stay quiet this long (no connect timeout per event)
log = logging.getLogger("trinity.notify")
_clients: dict[tuple[int, str], object] = {}  # per (process, URL): a forked worker child opens its own
_down_until = 0.0


def event_committed(job_id: str, seq: int | None) -> None:
    _publish(EVENTS, {"job": job_id, "seq": seq})


def key_revoked(key_hash: str) -> None:
    _publish(KEYS, {"key_hash": key_hash})


def _publish(channel: str, message: dict) -> None:
    global _down_until
    url = get_settings().notify_redis_url
    if url is None or time.monotonic() < _down_until:
        return
    try:
        _client(url).publish(channel, json.dumps(message, separators=(",", ":")))
    except Exception as error:  # noqa: BLE001  (any Redis failure: readers fall back to polling)
        _down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("notification not sent (%s); SSE followers fall back to polling", error)


def _client(url: str):  # noqa: ANN202
    key = (os.getpid(), url)
    if key not in _clients:
        import redis

        _clients[key] = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    return _clients[key]
