"""Event names and event types: per name and source, how often and when events occurred, with
the label (`GET /v1/events/names`, `GET /v1/event-types/`), and setting a type's label
(`PATCH /v1/event-types/{id}`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import duckdb

from aggregator.errors import NotFound
from aggregator.services.event_service import resolve_customers
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import (
    EventQuery,
    EventTypeRow,
    NameStats,
    Store,
    name_stats,
    stored_types,
    type_id,
)
from meters.event_types import EventTypeUpdate, type_label

__all__ = ["NAME_SORTS", "TYPE_SORTS", "EventType", "EventTypeQuery", "list_", "update"]

Con = duckdb.DuckDBPyConnection

NAME_SORTS = frozenset({"name", "occurrences", "first_seen", "last_seen"})
TYPE_SORTS = NAME_SORTS | {"label"}


@dataclass(frozen=True, slots=True)
class EventType:
    stats: NameStats
    label: str
    # Set for user event types; system ones have no id, creation or label of their own.
    id: str | None
    label_property_selector: str | None
    created_at_us: int | None
    modified_at_us: int | None


@dataclass(frozen=True, slots=True)
class EventTypeQuery:
    events: EventQuery  # which events count (customers are resolved here)
    text: str | None = None  # contained in the name (or the label), any case
    text_in_label: bool = False
    sorting: tuple[str, ...] = ("-last_seen",)


def _typed(organization_id: str, stats: NameStats, stored: EventTypeRow | None) -> EventType:
    user = stats.source == "user"
    return EventType(
        stats,
        type_label(stats.name, stats.source, stored.label if stored else None),
        type_id(organization_id, stats.name) if user else None,
        stored.label_property_selector if stored and user else None,
        (stored.created_at_us if stored else stats.first_ingested_us) if user else None,
        stored.modified_at_us if stored and user else None,
    )


_SORT_KEYS = {
    "name": lambda t: t.stats.name,
    "label": lambda t: t.label,
    "occurrences": lambda t: t.stats.occurrences,
    "first_seen": lambda t: t.stats.first_seen_us,
    "last_seen": lambda t: t.stats.last_seen_us,
}


async def list_(
    store: Store,
    organization_id: str,
    q: EventTypeQuery,
    *,
    customer_ids: tuple[str, ...],
    external_customer_ids: tuple[str, ...],
    page: int,
    limit: int,
) -> Page[EventType]:
    """The names and sources of the events `q` selects, sorted by `q.sorting` (then by name
    and source), one page of them."""

    def run(con: Con) -> list[EventType]:
        events = q.events
        if customer_ids or external_customer_ids:
            ids, external = resolve_customers(
                con, organization_id, customer_ids, external_customer_ids
            )
            events = replace(events, customer_ids=ids, external_customer_ids=external)
        stats = name_stats(con, organization_id, events)
        stored = stored_types(con, organization_id, [s.name for s in stats])
        return [_typed(organization_id, s, stored.get(s.name)) for s in stats]

    found = await store.read(run)
    if q.text is not None:
        text = q.text.lower()
        found = [
            t
            for t in found
            if text in t.stats.name.lower() or (q.text_in_label and text in t.label.lower())
        ]
    found.sort(key=lambda t: (t.stats.name, t.stats.source))
    for criterion in reversed(q.sorting):
        found.sort(key=_SORT_KEYS[criterion.removeprefix("-")], reverse=criterion[0] == "-")
    start = offset(page, limit)
    return Page(found[start : start + limit], len(found))


async def update(
    store: Store,
    organization_id: str,
    event_type_id: str,
    data: EventTypeUpdate,
    *,
    request_id: str | None = None,
) -> EventType:
    """Set the label of the user event type with this id (a 404 if no user event has it)."""

    def find(con: Con) -> NameStats | None:
        for stats in name_stats(con, organization_id, EventQuery(sources=("user",))):
            if type_id(organization_id, stats.name) == event_type_id:
                return stats
        return None

    stats = await store.read(find)
    if stats is None:
        raise NotFound("Event type not found")
    row = await store.submit(
        record(
            "event_type.label",
            organization_id,
            request_id,
            name=stats.name,
            first_ingested_us=stats.first_ingested_us,
            label=data.label,
            selector=data.label_property_selector,
        )
    )
    return _typed(organization_id, stats, row)
