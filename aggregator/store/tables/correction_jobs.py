"""The corrections' writer jobs: void events, amend one, replace a range (`corrections` says
what each does to what is stored). Each is a write record's (`meters.commands`: `event.void`,
`event.amend`, `event.replace`), so its arguments are what the API validated, its time the
record's, and the new events' seqs, and so their ids, the journal's order.

Each request also stores a system event (`event.voided`, `event.amended` or `event.replaced`:
who asked, why, how many) and a webhook event of the same name for the endpoints that take it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from aggregator.errors import NotFound
from aggregator.store.base.ids import derived_id
from aggregator.store.base.rows import first_row
from aggregator.store.machinery.writer import Job, Tx
from aggregator.store.tables import webhook_tables
from aggregator.store.tables.corrections import Corrected, correct
from aggregator.store.tables.customer_tables import get_customer, get_customer_by_external_id
from meters.corrections import AMENDED, REPLACED, VOIDED, Amendment, EventReplace, VoidRequest
from meters.errors import FieldError, ValidationFailed
from meters.events import Event, to_table
from meters.times import datetime_to_us

__all__ = ["Replaced", "Voided", "amend_job", "replace_job", "void_job"]


@dataclass(frozen=True, slots=True)
class Voided:
    """What a void did: the events voided (ids), and what it named that no current event of
    the organization is (already voided, another organization's, never stored)."""

    voided: int
    ids: list[str]
    not_found: list[str]


@dataclass(frozen=True, slots=True)
class Replaced:
    """What a replacement did (or would do: `dry_run`)."""

    voided: int
    inserted: int
    duplicates: int
    dry_run: bool


def void_job(
    organization_id: str,
    request: VoidRequest,
    actor: str | None,
    now_us: int,
    request_id: str,
    *,
    through_seq: int | None = None,
) -> Job[Voided]:
    """Void the events `request` names (a filter's: up to `through_seq`, the last applied when
    it was asked, so that a void never reaches events sent after it)."""

    def job(tx: Tx) -> Voided:
        where, params = _selected(tx.con, organization_id, request, through_seq)
        done = correct(
            tx,
            organization_id,
            where,
            params,
            None,
            request_id=request_id,
            reason=request.reason,
            now_us=now_us,
        )
        named = [str(i) for i in request.ids or []] or list(request.external_ids or [])
        found = set(done.voided_ids) | {e for e in done.voided_external_ids if e is not None}
        _record(tx, organization_id, VOIDED, request_id, now_us, actor, request.reason, done, {})
        return Voided(len(done.voided_ids), done.voided_ids, [n for n in named if n not in found])

    return job


def _selected(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    request: VoidRequest,
    through_seq: int | None,
) -> tuple[str, list[Any]]:
    """The condition on `events` of what `request` names."""
    if request.ids is not None:
        return "id IN (SELECT unnest(?::UUID[]))", [[str(i) for i in request.ids]]
    if request.external_ids is not None:
        return "external_id IN (SELECT unnest(?::VARCHAR[]))", [request.external_ids]
    chosen = request.filter
    assert chosen is not None
    clauses, params = _customer_clause(
        con, organization_id, chosen.customer_id, chosen.external_customer_id
    )
    if chosen.name is not None:
        clauses.append("name = ?")
        params.append(chosen.name)
    clauses += _range(chosen.start_timestamp, chosen.end_timestamp, params)
    if through_seq is not None:
        clauses.append("seq <= ?")
        params.append(through_seq)
    return " AND ".join(clauses), params


def _customer_clause(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    customer_id: Any,
    external_id: str | None,
) -> tuple[list[str], list[Any]]:
    """Events of the customer named either way (by its id or its external id); of an external
    id no customer has, those naming it."""
    customer = (
        get_customer(con, organization_id, str(customer_id))
        if customer_id is not None
        else get_customer_by_external_id(con, organization_id, external_id or "")
    )
    if customer is None and customer_id is not None:
        raise NotFound("Customer not found")
    ids = [customer.id] if customer is not None else []
    externals = [customer.external_id] if customer is not None and customer.external_id else []
    if customer is None and external_id is not None:
        externals = [external_id]
    return (
        [
            "(customer_id IN (SELECT unnest(?::UUID[]))"
            " OR external_customer_id IN (SELECT unnest(?::VARCHAR[])))"
        ],
        [ids, externals],
    )


def _range(start: Any, end: Any, params: list[Any]) -> list[str]:
    clauses = []
    if start is not None:
        clauses.append("timestamp >= make_timestamptz(?)")
        params.append(datetime_to_us(start))
    if end is not None:
        clauses.append("timestamp < make_timestamptz(?)")
        params.append(datetime_to_us(end))
    return clauses


def amend_job(
    organization_id: str,
    event_id: str,
    amendment: Amendment,
    actor: str | None,
    now_us: int,
    request_id: str,
) -> Job[str]:
    """The event's new version (its id) in place of the current one, which is voided."""

    def job(tx: Tx) -> str:
        con = tx.con
        current = _current(con, organization_id, event_id)
        event = amendment.applied(current)
        _customers_known(con, organization_id, [event], ("body",))
        version = _version(con, event_id) + 1
        done = correct(
            tx,
            organization_id,
            "id = ?::UUID",
            [event_id],
            _table(organization_id, [event], now_us),
            request_id=request_id,
            reason=amendment.reason,
            now_us=now_us,
            keyed=False,
        )
        new_id = _new_ids(con, done)[0]
        con.execute(
            "INSERT INTO event_versions VALUES (?::UUID, ?::UUID, ?::UUID, ?)",
            [new_id, organization_id, event_id, version],
        )
        extra = {"event_id": event_id, "new_event_id": new_id, "version": version}
        reason = amendment.reason
        _record(tx, organization_id, AMENDED, request_id, now_us, actor, reason, done, extra)
        return new_id

    return job


def _current(con: duckdb.DuckDBPyConnection, organization_id: str, event_id: str) -> Event:
    """The current user event `event_id` as validated events are (404 if there is none)."""
    row = first_row(
        con,
        "SELECT name, epoch_us(timestamp), customer_id::VARCHAR, external_customer_id,"
        " external_id, parent_id, external_member_id, metadata, cost_amount::VARCHAR"
        " FROM events WHERE organization_id = ?::UUID AND id = ?::UUID AND source = 'user'",
        [organization_id, event_id],
    )
    if row is None:
        raise NotFound("Event not found")
    cost = None if row[8] is None else _canonical(str(row[8]))
    name, at_us, customer_id, external_customer_id, external_id, parent_id, member = row[:7]
    return Event(
        name=name,
        timestamp_us=at_us,
        customer_id=customer_id,
        external_customer_id=external_customer_id,
        external_id=external_id,
        parent_id=parent_id,
        external_member_id=member,
        metadata=orjson.loads(row[7]),
        cost_amount=cost,
    )


def _canonical(amount: str) -> str:
    """A stored DECIMAL as the canonical string validation gives (no trailing zeros)."""
    whole, _, fraction = amount.partition(".")
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def replace_job(
    organization_id: str,
    request: EventReplace,
    events: Sequence[Event],
    actor: str | None,
    now_us: int,
    request_id: str,
) -> Job[Replaced]:
    """The current user events of the range (of the customer it names, if any) voided and
    `events` (`meters.corrections.replacements`) stored, of which those whose external id
    another event holds (not one this range voids) are duplicates, left out."""

    def job(tx: Tx) -> Replaced:
        con = tx.con
        clauses: list[str] = []
        params: list[Any] = []
        if request.customer_id is not None or request.external_customer_id is not None:
            clauses, params = _customer_clause(
                con, organization_id, request.customer_id, request.external_customer_id
            )
        clauses += _range(request.start_timestamp, request.end_timestamp, params)
        where = " AND ".join(clauses)
        _customers_known(con, organization_id, events, ("body", "events"))
        voided_keys = {
            str(r[0])
            for r in con.execute(
                "SELECT external_id FROM events WHERE organization_id = ?::UUID"  # noqa: S608 - fixed text, values bound
                f" AND source = 'user' AND external_id IS NOT NULL AND {where}",
                [organization_id, *params],
            ).fetchall()
        }
        kept, duplicates = _not_duplicates(con, organization_id, events, voided_keys)
        reason = request.reason or "replaced"
        done = correct(
            tx,
            organization_id,
            where,
            params,
            _table(organization_id, kept, now_us),
            request_id=request_id,
            reason=reason,
            now_us=now_us,
        )
        extra = {
            "start_timestamp": datetime_to_us(request.start_timestamp),
            "end_timestamp": datetime_to_us(request.end_timestamp),
        }
        _record(tx, organization_id, REPLACED, request_id, now_us, actor, reason, done, extra)
        return Replaced(len(done.voided_ids), done.inserted, duplicates, False)

    return job


# ---- helpers -------------------------------------------------------------------------------


def _table(organization_id: str, events: Sequence[Event], now_us: int) -> pa.Table:
    """`events` as applying takes them (`Applied.events`' columns but seq), ingested now."""
    table = to_table(events)
    n = table.num_rows
    return (
        table.append_column("organization_id", pa.array([organization_id] * n, pa.string()))
        .append_column("source", pa.array(["user"] * n, pa.string()))
        .append_column("ingested_at", pa.array([now_us] * n, pa.timestamp("us", tz="UTC")))
    )


def _new_ids(con: duckdb.DuckDBPyConnection, done: Corrected) -> list[str]:
    rows = con.execute(
        "SELECT id::VARCHAR FROM all_events WHERE seq >= ? AND seq < ? ORDER BY seq",
        [done.first_seq, done.first_seq + done.inserted],
    ).fetchall()
    return [str(r[0]) for r in rows]


def _version(con: duckdb.DuckDBPyConnection, event_id: str) -> int:
    row = first_row(con, "SELECT version FROM event_versions WHERE id = ?::UUID", [event_id])
    return 1 if row is None else int(row[0])


def _customers_known(
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


def _record(
    tx: Tx,
    organization_id: str,
    name: str,
    request_id: str,
    now_us: int,
    actor: str | None,
    reason: str,
    done: Corrected,
    extra: Mapping[str, Any],
) -> None:
    """The request's system event and webhook event (`name`)."""
    con, live = tx.con, tx.live
    metadata = {
        "reason": reason,
        "actor": actor,
        "request_id": request_id,
        "voided": len(done.voided_ids),
        "inserted": done.inserted,
        # The first ids only: a void may name up to a million.
        "event_ids": done.voided_ids[:100],
        **extra,
    }
    number = live.seq.reserve(1)
    con.execute(
        "INSERT INTO events_base (id, seq, organization_id, name, source, timestamp, ingested_at,"
        " metadata) VALUES (?::UUID, ?, ?::UUID, ?, 'system', make_timestamptz(?),"
        " make_timestamptz(?), ?)",
        [
            derived_id("system-event", organization_id, request_id, name),
            number,
            organization_id,
            name,
            now_us,
            now_us,
            orjson.dumps(metadata).decode(),
        ],
    )
    # A replacement voids too: its endpoints take it as `event.voided`, with what it inserted.
    kind = AMENDED if name == AMENDED else VOIDED
    data = {"organization_id": organization_id, "type": name, **metadata}
    webhook_id = derived_id("webhook-event", organization_id, request_id, kind)
    webhook_tables.enqueue_many(con, live, organization_id, kind, [(webhook_id, data)], now_us)
