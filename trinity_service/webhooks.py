"""Webhook endpoints and the delivery outbox: keyword-only, HTTP-free database operations.

``enqueue`` runs inside ``crud.transition``'s transaction: a job's state change and the deliveries
it causes commit together, so an API or worker that dies right after cannot lose one. Senders
(``api/webhook_sender.py``, in every API process) ``claim_due`` deliveries by moving their
``next_attempt_at`` forward with a compare-and-set (a lease: two senders never post the same
attempt), then ``record`` each attempt: delivered, retried later, or given up.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from trinity_service.models import now
from trinity_service.webhook_models import WebhookDelivery, WebhookEndpoint, new_secret

EVENT_OF_STATUS = {"running": "fine_tuning.job.running", "succeeded": "fine_tuning.job.succeeded",
                   "failed": "fine_tuning.job.failed", "cancelled": "fine_tuning.job.cancelled"}


def create_endpoint(*, session: Session, tenant: str, url: str, events: list[str],
                    description: str | None = None) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(tenant=tenant, url=url, events=list(dict.fromkeys(events)), description=description,
                               secret=new_secret())
    session.add(endpoint)
    session.commit()
    session.refresh(endpoint)
    return endpoint


def list_endpoints(*, session: Session, tenant: str) -> list[WebhookEndpoint]:
    return list(session.exec(select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant)
                             .order_by(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id))))


def get_endpoint(*, session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint | None:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    return endpoint if endpoint is not None and endpoint.tenant == tenant else None


def delete_endpoint(*, session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint and its deliveries (pending ones are never sent)."""
    session.execute(delete(WebhookDelivery).where(col(WebhookDelivery.endpoint_id) == endpoint.id))
    session.delete(endpoint)
    session.commit()


def enqueue(session: Session, *, job_id: str, tenant: str, status: str, previous: str,
            data: dict[str, Any] | None = None) -> int:
    """Add a delivery per subscribed endpoint for a job's move to ``status``; the caller commits."""
    kind = EVENT_OF_STATUS.get(status)
    if kind is None:
        return 0
    stamp = now()
    count = 0
    for endpoint in list_endpoints(session=session, tenant=tenant):
        if kind not in endpoint.events:
            continue
        delivery = WebhookDelivery(endpoint_id=endpoint.id, job_id=job_id, type=kind, next_attempt_at=stamp,
                                   created_at=stamp, payload={})
        delivery.payload = {"id": delivery.id, "object": "event", "type": kind, "created_at": int(stamp),
                            "data": {"id": job_id, "object": "fine_tuning.job", "status": status,
                                     "previous": previous, **(data or {})}}
        session.add(delivery)
        count += 1
    return count


def list_deliveries(*, session: Session, endpoint_id: str, limit: int,
                    status: str | None = None) -> tuple[list[WebhookDelivery], bool]:
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if status:
        query = query.where(WebhookDelivery.status == status)
    rows = list(session.exec(query.order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id).desc())
                             .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def claim_due(*, session: Session, lease_s: float, limit: int = 20,
              at: float | None = None) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
    """Pending deliveries due by ``at`` (default now), each leased for ``lease_s`` to this caller."""
    at = now() if at is None else at
    due = list(session.exec(select(WebhookDelivery).where(
        WebhookDelivery.status == "pending", col(WebhookDelivery.next_attempt_at) <= at)
        .order_by(col(WebhookDelivery.next_attempt_at)).limit(limit)))
    claimed = []
    for delivery in due:
        res = session.execute(update(WebhookDelivery).where(
            col(WebhookDelivery.id) == delivery.id, col(WebhookDelivery.status) == "pending",
            col(WebhookDelivery.next_attempt_at) == delivery.next_attempt_at).values(next_attempt_at=at + lease_s))
        session.commit()
        if res.rowcount == 1:
            endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
            if endpoint is not None:
                claimed.append((delivery, endpoint))
    return claimed


def record(*, session: Session, delivery_id: str, entry: dict[str, Any], delivered: bool,
           retry_at: float | None) -> WebhookDelivery | None:
    """One attempt's outcome: delivered, due again at ``retry_at``, or (``retry_at`` None) failed for good."""
    delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if delivery is None:  # its endpoint was deleted meanwhile
        return None
    delivery.log = [*delivery.log, entry]
    delivery.attempts += 1
    if delivered:
        delivery.status, delivery.delivered_at = "delivered", entry["at"]
    elif retry_at is None:
        delivery.status = "failed"
    else:
        delivery.next_attempt_at = retry_at
    session.add(delivery)
    session.commit()
    session.refresh(delivery)
    return delivery
