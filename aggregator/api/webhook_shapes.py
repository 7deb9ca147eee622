"""Webhooks in Polar's shapes (`WebhookEndpoint`, `WebhookDelivery`, `WebhookEvent`), with
meterline's additions: why an endpoint was disabled, and each attempt's number, endpoint and
latency."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.pages import Page
from aggregator.services.webhook_service import DeliveryRow, EndpointRow, WebhookEvent
from meters.webhook_rules import API_VERSION, EndpointCreate, EndpointUpdate

__all__ = [
    "DeliveryShape",
    "EndpointCreate",
    "EndpointShape",
    "EndpointUpdate",
    "EventShape",
    "deliveries",
    "endpoint",
    "endpoints",
]


class EndpointShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    url: str
    name: str | None
    api_version: str
    format: str
    secret: str
    organization_id: str
    events: list[str]
    enabled: bool
    uses_standard_webhook_signature: bool
    disabled_reason: str | None  # meterline's: why it disabled the endpoint


class EventShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    last_http_code: int | None
    succeeded: bool | None
    skipped: bool
    api_version: str
    payload: str | None
    type: str
    is_archived: bool


class DeliveryShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    succeeded: bool
    http_code: int | None
    response: str | None
    webhook_event: EventShape
    endpoint_id: str  # meterline's
    attempt: int  # meterline's: 1 for the first attempt of this event at this endpoint
    latency_ms: float  # meterline's


def endpoint(row: EndpointRow) -> EndpointShape:
    return {
        "id": row.id,
        "created_at": iso(row.created_at_us),
        "modified_at": iso(row.modified_at_us),
        "url": row.url,
        "name": row.name,
        "api_version": API_VERSION,
        "format": row.format,
        "secret": row.secret,
        "organization_id": row.organization_id,
        "events": row.events,
        "enabled": row.enabled,
        "uses_standard_webhook_signature": True,
        "disabled_reason": row.disabled_reason,
    }


def endpoints(page: Page[EndpointRow], limit: int) -> ListResource[EndpointShape]:
    return {"items": [endpoint(r) for r in page.items], "pagination": pagination(page.total, limit)}


def event(row: WebhookEvent) -> EventShape:
    return {
        "id": row.id,
        "created_at": iso(row.created_at_us),
        "modified_at": None,
        "last_http_code": row.last_http_code,
        "succeeded": row.succeeded,
        "skipped": False,
        "api_version": API_VERSION,
        "payload": row.payload,
        "type": row.type,
        "is_archived": False,
    }


def delivery(row: DeliveryRow) -> DeliveryShape:
    return {
        "id": row.id,
        "created_at": iso(row.created_at_us),
        "modified_at": None,
        "succeeded": row.succeeded,
        "http_code": row.http_code,
        "response": row.response,
        "webhook_event": event(row.event),
        "endpoint_id": row.endpoint_id,
        "attempt": row.attempt,
        "latency_ms": row.latency_ms,
    }


def deliveries(page: Page[DeliveryRow], limit: int) -> ListResource[DeliveryShape]:
    return {"items": [delivery(r) for r in page.items], "pagination": pagination(page.total, limit)}
