"""What a correction selects, the same whether it is applied (`correction_jobs`) or previewed
(`correction_reads`, a replacement's dry run): the events of a customer named either way and
of a time range, and of a replacement the events it keeps (those that are no duplicates)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from aggregator.errors import CustomerElsewhere, NotFound
from aggregator.store.base import subjects
from aggregator.store.tables.customer_tables import get_customer, get_customer_by_external_id
from aggregator.store.tables.ledger_tables import Ledgers
from meters.corrections import EventReplace
from meters.errors import FieldError, ValidationFailed
from meters.events import Event
from meters.times import datetime_to_us

__all__ = ["Replacement", "customer_clause", "customers_known", "replacement", "time_range"]


@dataclass(frozen=True, slots=True)
class Replacement:
    """A replacement as selected: `where` (SQL on `events`, with `params`) the current events
    it voids, in [start_us, end_us) and of the customer's `subjects` (None: every customer's);
    `kept` the events it stores, `duplicates` how many of those given it leaves out;
    `replaced` the id of the event it voids of each external id (a kept event with one is
    that event's next version)."""

    where: str
    params: list[Any]
    subjects: tuple[str, ...] | None
    start_us: int
    end_us: int
    kept: list[Event]
    duplicates: int
    replaced: dict[str, str]


def replacement(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    request: EventReplace,
    events: Sequence[Event],
    ledgers: Ledgers | None = None,
) -> Replacement:
    """The current user events of the range (of the customer it names, if any), and `events`
    (`meters.corrections.replacements`) less those whose external id another event holds (not
    one this range voids). 422 for an event naming a customer id the organization lacks.

    On a shard of several (`ledgers`), whose events are those of the customers it holds: a
    customer named that another shard holds is refused (`CustomerElsewhere`, before any
    write: that shard applies it); of every customer's replacement, the events of the customers
    it holds only."""
    clauses: list[str] = []
    params: list[Any] = []
    named: tuple[str, ...] | None = None
    if request.customer_id is not None or request.external_customer_id is not None:
        clauses, params, named = customer_clause(
            con, organization_id, request.customer_id, request.external_customer_id, ledgers
        )
    clauses += time_range(request.start_timestamp, request.end_timestamp, params)
    where = " AND ".join(clauses)
    customers_known(con, organization_id, events, ("body", "events"))
    if named is None and ledgers is not None and ledgers.sharded:
        refs = [(organization_id, e.customer_id, e.external_customer_id) for e in events]
        held = ledgers.holding(con, refs)
        events = [e for e, ref in zip(events, refs, strict=True) if held[ref]]
    replaced = {
        str(r[0]): str(r[1])
        for r in con.execute(
            "SELECT external_id, id::VARCHAR FROM events WHERE organization_id = ?::UUID"  # noqa: S608 - fixed text, values bound
            f" AND source = 'user' AND external_id IS NOT NULL AND {where}",
            [organization_id, *params],
        ).fetchall()
    }
    kept, duplicates = _not_duplicates(con, organization_id, events, set(replaced))
    return Replacement(
        where,
        params,
        named,
        datetime_to_us(request.start_timestamp),
        datetime_to_us(request.end_timestamp),
        kept,
        duplicates,
        replaced,
    )


def customer_clause(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    customer_id: Any,
    external_id: str | None,
    ledgers: Ledgers | None = None,
) -> tuple[list[str], list[Any], tuple[str, ...]]:
    """Events of the customer named either way (by its id or its external id); of an external
    id no customer has, those naming it. With the subjects those events have. A customer
    another shard holds is refused (`CustomerElsewhere`) where `ledgers` say so."""
    customer = (
        get_customer(con, organization_id, str(customer_id))
        if customer_id is not None
        else get_customer_by_external_id(con, organization_id, external_id or "")
    )
    if customer is None and customer_id is not None:
        raise NotFound("Customer not found")
    if ledgers is not None and ledgers.sharded:
        ref = (organization_id, customer.id if customer else None, external_id)
        if not ledgers.holding(con, [ref])[ref]:
            raise CustomerElsewhere()
    ids = [customer.id] if customer is not None else []
    externals = [customer.external_id] if customer is not None and customer.external_id else []
    if customer is None and external_id is not None:
        externals = [external_id]
    named = (*map(subjects.of_id, ids), *map(subjects.of_external, externals))
    return (
        [
            "(customer_id IN (SELECT unnest(?::UUID[]))"
            " OR external_customer_id IN (SELECT unnest(?::VARCHAR[])))"
        ],
        [ids, externals],
        named,
    )


def time_range(start: Any, end: Any, params: list[Any]) -> list[str]:
    """Clauses of events in [start, end) (either end open when None), their values added to
    `params`."""
    clauses = []
    if start is not None:
        clauses.append("timestamp >= make_timestamptz(?)")
        params.append(datetime_to_us(start))
    if end is not None:
        clauses.append("timestamp < make_timestamptz(?)")
        params.append(datetime_to_us(end))
    return clauses


def customers_known(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    events: Sequence[Event],
    at: tuple[str, ...],
) -> None:
    """Refuse events naming a customer id the organization does not have (as ingest does);
    `at`: where the events are in the request (a list's, or a PATCH body's one)."""
    named = sorted({e.customer_id for e in events if e.customer_id})
    known = {
        str(r[0])
        for r in con.execute(
            "SELECT id::VARCHAR FROM customers WHERE organization_id = ?::UUID"
            " AND id IN (SELECT unnest(?::UUID[]))",
            [organization_id, named],
        ).fetchall()
    }
    errors = [
        FieldError(
            "customer_id",
            (*at, i, "customer_id") if at[-1] == "events" else (*at, "customer_id"),
            "Customer not found.",
            e.customer_id,
        )
        for i, e in enumerate(events)
        if e.customer_id and e.customer_id not in known
    ]
    if errors:
        raise ValidationFailed(errors, business=True)


def _not_duplicates(
    con: duckdb.DuckDBPyConnection, organization_id: str, events: Sequence[Event], voided: set[str]
) -> tuple[list[Event], int]:
    """The events to store: those whose external id is one the range voids (a new version of
    it), or new (no stored event has it, nor an earlier one of `events`)."""
    named = sorted({e.external_id for e in events if e.external_id and e.external_id not in voided})
    taken = (
        {
            r[0]
            for r in con.execute(
                "SELECT external_id FROM all_events WHERE organization_id = ?::UUID"
                " AND external_id IN (SELECT unnest(?::VARCHAR[]))",
                [organization_id, named],
            ).fetchall()
        }
        if named
        else set()
    )
    kept: list[Event] = []
    seen: set[str] = set()
    for event in events:
        key = event.external_id
        if key is not None and (key in taken or key in seen):
            continue
        if key is not None:
            seen.add(key)
        kept.append(event)
    return kept, len(events) - len(kept)
