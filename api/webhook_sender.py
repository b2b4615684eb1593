"""The webhook sender: POSTs due outbox deliveries (``trinity_service.webhooks``), signed the Standard Webhooks
way (https://www.standardwebhooks.com, the ``standardwebhooks`` package): headers ``webhook-id``
(the same on every retry), ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` + base64
HMAC-SHA256 of ``id.timestamp.body`` with the endpoint's secret), signed afresh on each attempt.

A 2xx answer is delivered; anything else (an error status, a refused connection, a timeout) is
logged on the delivery and tried again after ``webhook_retry_s`` × 2^(attempt−1), capped at
``webhook_retry_max_s``, up to ``webhook_max_attempts``. It runs as a thread in every API process
(``trinity serve`` included), not in the Celery worker: that one runs a single training job at a
time, for days. Deliveries live in the database, so they survive any restart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone

import httpx
from standardwebhooks.webhooks import Webhook

from trinity_service import webhooks
from trinity_service.db import session_scope
from trinity_service.settings import Settings, get_settings
from trinity_service.webhook_models import WebhookDelivery, WebhookEndpoint

log = logging.getLogger("trinity.webhooks")


def signed_headers(delivery_id: str, secret: str, body: str, at: datetime) -> dict[str, str]:
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign(delivery_id, at, body),
            "content-type": "application/json", "user-agent": "Trinity-Webhooks/1"}


def attempt(delivery: WebhookDelivery, endpoint: WebhookEndpoint, client: httpx.Client) -> dict:
    """POST once; the log entry ``{at, status_code?, error?, duration_ms}``."""
    body = json.dumps(delivery.payload, separators=(",", ":"))
    started = time.time()
    entry: dict = {"at": started}
    try:
        response = client.post(endpoint.url, content=body.encode(),
                               headers=signed_headers(delivery.id, endpoint.secret, body,
                                                      datetime.fromtimestamp(started, timezone.utc)))
        entry["status_code"] = response.status_code
        if not response.is_success:
            entry["error"] = f"HTTP {response.status_code}: {response.text[:200]}"
    except httpx.HTTPError as error:
        entry["error"] = f"{type(error).__name__}: {error}"[:300]
    entry["duration_ms"] = round((time.time() - started) * 1000, 1)
    return entry


def retry_delay(attempts: int, settings: Settings) -> float:
    """Seconds before the next try after ``attempts`` failed tries."""
    return min(settings.webhook_retry_s * 2 ** (attempts - 1), settings.webhook_retry_max_s)


def send_due(settings: Settings | None = None, *, at: float | None = None) -> dict[str, int]:
    """Claim every due delivery and try it once; counts of delivered / retrying / failed."""
    settings = settings or get_settings()
    counts = {"delivered": 0, "retrying": 0, "failed": 0}
    with session_scope() as session:
        due = webhooks.claim_due(session=session, lease_s=settings.webhook_timeout_s + 30, at=at)
        if not due:
            return counts
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
            for delivery, endpoint in due:
                entry = attempt(delivery, endpoint, client)
                ok = "error" not in entry
                tries = delivery.attempts + 1
                retry_at = None if ok or tries >= settings.webhook_max_attempts else \
                    entry["at"] + retry_delay(tries, settings)
                webhooks.record(session=session, delivery_id=delivery.id, entry=entry, delivered=ok, retry_at=retry_at)
                counts["delivered" if ok else "retrying" if retry_at else "failed"] += 1
                if not ok:
                    log.info("webhook %s to %s failed (try %d): %s", delivery.id, endpoint.url, tries, entry["error"])
    return counts


def start_thread(settings: Settings | None = None) -> threading.Event:
    """Send due deliveries every ``webhook_poll_s`` in a daemon thread; set the returned event to stop it."""
    settings = settings or get_settings()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.webhook_poll_s):
            try:
                send_due(settings)
            except Exception:  # the database being down for a moment must not end deliveries
                log.exception("webhook sweep failed")

    threading.Thread(target=loop, name="trinity-webhooks", daemon=True).start()
    return stop
