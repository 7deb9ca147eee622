"""Events as polar-sdk's `UserEvent` loads them (no request bodies: events are ingested by
`POST /v1/events/ingest`, `ingest.http`)."""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict

from aggregator.api.customer_shapes import CustomerShape, customer
from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.event_service import Event
from aggregator.services.pages import Page

__all__ = ["EventShape", "event", "events"]


class EventShape(TypedDict):
    id: str
    timestamp: str
    organization_id: str
    customer_id: str | None
    customer: CustomerShape | None
    external_customer_id: str | None
    member_id: None
    external_member_id: str | None
    child_count: int
    parent_id: str | None
    label: str
    name: str
    source: str
    metadata: dict[str, Any]
    # meterline's own (`meters.corrections`): the version (2 and up: an amendment's, or a
    # replacement's of an external id its range voided), and when and why the event was
    # voided (listed with `voided=true`; null while current).
    version: int
    voided_at: str | None
    void_reason: str | None


def event(e: Event, organization_id: str) -> EventShape:
    row, owner = e.row, e.customer
    return {
        "id": row.id,
        "timestamp": iso(row.timestamp_us),
        "organization_id": organization_id,
        "customer_id": row.customer_id or (owner.row.id if owner else None),
        "customer": customer(owner) if owner else None,
        "external_customer_id": row.external_customer_id
        or (owner.row.external_id if owner else None),
        "member_id": None,
        "external_member_id": row.external_member_id,
        "child_count": row.child_count,
        "parent_id": row.parent_id,
        "label": e.label,
        "name": row.name,
        "source": row.source,
        "metadata": row.metadata,
        "version": row.version,
        "voided_at": iso(row.voided.at_us) if row.voided else None,
        "void_reason": row.voided.reason if row.voided else None,
    }


def events(page: Page[Event], organization_id: str, limit: int) -> ListResource[EventShape]:
    return {
        "items": [event(e, organization_id) for e in page.items],
        "pagination": pagination(page.total, limit),
    }
