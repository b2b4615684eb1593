"""Webhook endpoints and their deliveries (the outbox), and their public shapes.

A delivery row is written in the same transaction as the job's status change
(``crud.transition``), so no event is lost when a process dies; ``api/webhook_sender.py`` sends it.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, Field as PField
from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel

from trinity_service.models import new_id, now

EventType = Literal["fine_tuning.job.running", "fine_tuning.job.succeeded", "fine_tuning.job.failed",
                    "fine_tuning.job.cancelled"]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoint"

    id: str = Field(default_factory=lambda: new_id("we"), primary_key=True, max_length=40)
    tenant: str = Field(index=True, max_length=200)
    url: str = Field(max_length=2000)
    description: str | None = Field(default=None, max_length=500)
    events: list[str] = Field(default_factory=lambda: list(EVENT_TYPES), sa_column=Column(JSON, nullable=False))
    secret: str = Field(max_length=100, description="Signing secret (the service must sign with it)")
    created_at: float = Field(default_factory=now)


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)

    id: str = Field(default_factory=lambda: f"msg_{secrets.token_hex(12)}", primary_key=True, max_length=40,
                    description="The webhook-id header: the same on every retry")
    endpoint_id: str = Field(foreign_key="webhook_endpoint.id", index=True, max_length=40)
    job_id: str = Field(max_length=40)
    type: str = Field(max_length=60)
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=20, description="pending | delivered | failed")
    attempts: int = 0
    next_attempt_at: float = Field(default_factory=now, description="Also the lease of a sender that claimed it")
    created_at: float = Field(default_factory=now)
    delivered_at: float | None = None
    log: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class WebhookEndpointCreate(BaseModel):
    url: AnyHttpUrl
    events: list[EventType] = PField(default_factory=lambda: list(EVENT_TYPES), min_length=1,
                                    description="Job state changes to send; default all")
    description: str | None = PField(None, max_length=500)


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None
    created_at: float
    secret: str | None = PField(None, description="Shown once, when the endpoint is created: verify signatures "
                                                 "with it (Standard Webhooks)")

    @classmethod
    def of(cls, endpoint: WebhookEndpoint, *, with_secret: bool = False) -> WebhookEndpointPublic:
        return cls(id=endpoint.id, url=endpoint.url, events=endpoint.events, description=endpoint.description,
                   created_at=endpoint.created_at, secret=endpoint.secret if with_secret else None)


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]


class WebhookDeliveryPublic(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    type: str
    job_id: str
    status: str
    attempts: int
    next_attempt_at: float | None = PField(description="When the next try is due (pending only)")
    created_at: float
    delivered_at: float | None
    payload: dict[str, Any]
    log: list[dict[str, Any]] = PField(description="Every attempt: time, status_code or error, duration_ms")

    @classmethod
    def of(cls, d: WebhookDelivery) -> WebhookDeliveryPublic:
        return cls(id=d.id, type=d.type, job_id=d.job_id, status=d.status, attempts=d.attempts,
                   next_attempt_at=d.next_attempt_at if d.status == "pending" else None, created_at=d.created_at,
                   delivered_at=d.delivered_at, payload=d.payload, log=d.log)


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryPublic] = PField(description="Newest first")
    has_more: bool
