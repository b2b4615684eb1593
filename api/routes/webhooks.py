"""POST /webhooks (register an endpoint; its signing secret is shown once), GET /webhooks,
GET/DELETE /webhooks/{id}, GET /webhooks/{id}/deliveries (the delivery log: every attempt)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from trinity_service import webhooks
from api.deps import SessionDep, TenantDep
from api.errors import not_found
from trinity_service.webhook_models import (
    WebhookDeliveryList,
    WebhookDeliveryPublic,
    WebhookEndpoint,
    WebhookEndpointCreate,
    WebhookEndpointList,
    WebhookEndpointPublic,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
EndpointId = Annotated[str, Path()]


def _own(session, tenant: str, endpoint_id: str) -> WebhookEndpoint:  # noqa: ANN001
    endpoint = webhooks.get_endpoint(session=session, tenant=tenant, endpoint_id=endpoint_id)
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id, "endpoint_id")
    return endpoint


@router.post("", status_code=201, response_model=WebhookEndpointPublic)
def create_endpoint(body: WebhookEndpointCreate, session: SessionDep, tenant: TenantDep):
    """Job state changes of this tenant (running, succeeded, failed, cancelled) are POSTed to ``url``,
    signed with the returned ``secret`` (Standard Webhooks), retried with backoff until a 2xx."""
    endpoint = webhooks.create_endpoint(session=session, tenant=tenant, url=str(body.url), events=list(body.events),
                                        description=body.description)
    return WebhookEndpointPublic.of(endpoint, with_secret=True)


@router.get("", response_model=WebhookEndpointList)
def list_endpoints(session: SessionDep, tenant: TenantDep):
    return WebhookEndpointList(data=[WebhookEndpointPublic.of(e) for e in
                                     webhooks.list_endpoints(session=session, tenant=tenant)])


@router.get("/{endpoint_id}", response_model=WebhookEndpointPublic)
def get_endpoint(session: SessionDep, tenant: TenantDep, endpoint_id: EndpointId):
    return WebhookEndpointPublic.of(_own(session, tenant, endpoint_id))


@router.delete("/{endpoint_id}", status_code=204)
def delete_endpoint(session: SessionDep, tenant: TenantDep, endpoint_id: EndpointId) -> None:
    """The endpoint and its delivery log; pending deliveries are not sent."""
    webhooks.delete_endpoint(session=session, endpoint=_own(session, tenant, endpoint_id))


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveryList)
def list_deliveries(session: SessionDep, tenant: TenantDep, endpoint_id: EndpointId,
                    status: Literal["pending", "delivered", "failed"] | None = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20):
    """Newest first, each with every attempt (time, HTTP status or error, duration)."""
    endpoint = _own(session, tenant, endpoint_id)
    rows, more = webhooks.list_deliveries(session=session, endpoint_id=endpoint.id, limit=limit, status=status)
    return WebhookDeliveryList(data=[WebhookDeliveryPublic.of(d) for d in rows], has_more=more)
