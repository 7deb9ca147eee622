"""Event names (polar-sdk's `EventName`) and event types (`EventTypeWithStats`, and `EventType`
after `PATCH`). The request is `meters.event_types.EventTypeUpdate`."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.event_type_service import EventType
from aggregator.services.pages import Page
from meters.event_types import EventTypeUpdate

__all__ = [
    "EventNameShape",
    "EventTypeShape",
    "EventTypeUpdate",
    "EventTypeWithStatsShape",
    "event_type",
    "event_types",
    "names",
]


class EventNameShape(TypedDict):
    name: str
    label: str
    source: str
    occurrences: int
    first_seen: str
    last_seen: str


class EventTypeShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    name: str
    label: str
    label_property_selector: str | None
    organization_id: str


class EventTypeWithStatsShape(TypedDict):
    id: str | None
    created_at: str | None
    modified_at: str | None
    name: str
    label: str
    label_property_selector: str | None
    organization_id: str
    source: str
    occurrences: int
    first_seen: str
    last_seen: str


def names(page: Page[EventType], limit: int) -> ListResource[EventNameShape]:
    return {
        "items": [
            {
                "name": t.stats.name,
                "label": t.label,
                "source": t.stats.source,
                "occurrences": t.stats.occurrences,
                "first_seen": iso(t.stats.first_seen_us),
                "last_seen": iso(t.stats.last_seen_us),
            }
            for t in page.items
        ],
        "pagination": pagination(page.total, limit),
    }


def _with_stats(t: EventType, organization_id: str) -> EventTypeWithStatsShape:
    return {
        "id": t.id,
        "created_at": iso(t.created_at_us),
        "modified_at": iso(t.modified_at_us),
        "name": t.stats.name,
        "label": t.label,
        "label_property_selector": t.label_property_selector,
        "organization_id": organization_id,
        "source": t.stats.source,
        "occurrences": t.stats.occurrences,
        "first_seen": iso(t.stats.first_seen_us),
        "last_seen": iso(t.stats.last_seen_us),
    }


def event_types(
    page: Page[EventType], organization_id: str, limit: int
) -> ListResource[EventTypeWithStatsShape]:
    return {
        "items": [_with_stats(t, organization_id) for t in page.items],
        "pagination": pagination(page.total, limit),
    }


def event_type(t: EventType, organization_id: str) -> EventTypeShape:
    assert t.id is not None and t.created_at_us is not None, "a user event type"
    return {
        "id": t.id,
        "created_at": iso(t.created_at_us),
        "modified_at": iso(t.modified_at_us),
        "name": t.stats.name,
        "label": t.label,
        "label_property_selector": t.label_property_selector,
        "organization_id": organization_id,
    }
