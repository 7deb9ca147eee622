"""Events: list (filtered by customer, meter, name, time, metadata, parent) and get, each with
the customer it names."""

from __future__ import annotations

from dataclasses import dataclass, replace

import duckdb

from aggregator.errors import NotFound
from aggregator.services.customer_service import Customer, with_first_events
from aggregator.services.meter_service import evaluable, found
from aggregator.services.pages import Page
from aggregator.store import (
    EventQuery,
    Store,
    event_type_tables,
    filter_sql,
    get_meter,
    meter_events_sql,
)
from aggregator.store import customer_tables as customer_sql
from aggregator.store import event_tables as sql
from meters.corrections import NAMES as CORRECTIONS
from meters.event_types import label
from meters.filters import Filter

__all__ = ["Event", "EventQuery", "Selection", "get", "keys", "list_", "resolve_customers"]

Con = duckdb.DuckDBPyConnection


@dataclass(frozen=True, slots=True)
class Event:
    row: sql.EventRow
    customer: Customer | None  # the customer its id or external id names, if any
    label: str  # its event type's (`meters.event_types.label`)


def resolve_customers(
    con: Con, organization_id: str, ids: tuple[str, ...], external: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A customer's events may carry its id or its external id: filter on both."""
    if not ids and not external:
        return (), ()
    customers = customer_sql.customers_by_refs(con, organization_id, list(ids), list(external))
    all_ids = set(ids) | {c.id for c in customers}
    all_external = set(external) | {c.external_id for c in customers if c.external_id}
    return tuple(sorted(all_ids)), tuple(sorted(all_external))


def _with_customers(con: Con, organization_id: str, rows: list[sql.EventRow]) -> list[Event]:
    """The events with their customers (one read of customers, one of their first events) and
    labels (one read of event types)."""
    owners = with_first_events(
        con,
        organization_id,
        customer_sql.customers_by_refs(
            con,
            organization_id,
            sorted({r.customer_id for r in rows if r.customer_id}),
            sorted({r.external_customer_id for r in rows if r.external_customer_id}),
        ),
    )
    by_id = {o.row.id: o for o in owners}
    by_external = {o.row.external_id: o for o in owners if o.row.external_id}
    types = event_type_tables.stored_types(
        con, organization_id, [r.name for r in rows if r.source == "user"]
    )
    return [
        Event(
            r,
            by_id.get(r.customer_id or "") or by_external.get(r.external_customer_id or ""),
            label(r.name, r.source, r.metadata, _label_of(types.get(r.name))),
        )
        for r in rows
    ]


def _label_of(row: event_type_tables.EventTypeRow | None) -> tuple[str, str | None] | None:
    return None if row is None else (row.label, row.label_property_selector)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events a list holds: `query`, and those the meter counts (if given), those
    `matching` matches (if given), those with `text` in their name, source or metadata or of a
    customer it matches (if given), of the customers named (if any, by either of their ids)."""

    query: EventQuery
    meter_id: str | None = None
    matching: Filter | None = None
    text: str | None = None
    customer_ids: tuple[str, ...] = ()
    external_customer_ids: tuple[str, ...] = ()

    def narrowed(self, con: Con, organization_id: str) -> EventQuery | None:
        """The query that selects them (None: customers named, none of them known)."""
        q = self.query
        if self.text is not None:
            found_ids, found_external = customer_sql.matching_text(con, organization_id, self.text)
            q = replace(q, search=(self.text, tuple(found_ids), tuple(found_external)))
        if self.matching is not None:
            q = replace(q, conditions=(*q.conditions, filter_sql(self.matching)))
        if self.meter_id is not None:
            meter = evaluable(found(get_meter(con, organization_id, self.meter_id)))
            counted = meter_events_sql(meter.filter, meter.aggregation)
            q = replace(q, conditions=(*q.conditions, counted))
        if self.customer_ids or self.external_customer_ids:
            ids, external = resolve_customers(
                con, organization_id, self.customer_ids, self.external_customer_ids
            )
            if not ids and not external:
                return None
            q = replace(q, customer_ids=ids, external_customer_ids=external)
        return q


async def list_(
    store: Store, organization_id: str, selection: Selection, *, start: int, limit: int
) -> Page[Event]:
    """The selected events from the `start`th (0 the first), `limit` of them."""

    def run(con: Con) -> Page[Event]:
        q = selection.narrowed(con, organization_id)
        if q is None:
            return Page([], 0)
        rows, total = sql.list_events(con, organization_id, q, limit=limit, offset=start)
        return Page(_with_customers(con, organization_id, rows), total)

    return await store.read(run)


async def keys(
    store: Store, organization_id: str, selection: Selection, limit: int
) -> tuple[list[tuple[int, int, str, int, str]], int]:
    """The first `limit` selected events' places in the list's order (`event_keys`), and how
    many are selected."""

    def run(con: Con) -> tuple[list[tuple[int, int, str, int, str]], int]:
        q = selection.narrowed(con, organization_id)
        return ([], 0) if q is None else sql.event_keys(con, organization_id, q, limit)

    return await store.read(run)


async def get(
    store: Store, organization_id: str, event_id: str, *, polar_version: bool = False
) -> Event:
    """`polar_version`: the client names a Polar API version, which has none of the
    corrections' system events (`EventQuery.polar_version`): they are not found."""

    def run(con: Con) -> Event:
        row = sql.get_event(con, organization_id, event_id)
        if row is None or (polar_version and row.source == "system" and row.name in CORRECTIONS):
            raise NotFound("Event not found")
        return _with_customers(con, organization_id, [row])[0]

    return await store.read(run)
