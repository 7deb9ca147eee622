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

from aggregator.errors import NotFound
from aggregator.store.base.ids import derived_id
from aggregator.store.base.rows import first_row
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.tables import webhook_tables
from aggregator.store.tables.correction_reads import Before, Replaced, applied_table, usage_in
from aggregator.store.tables.correction_scope import (
    customer_clause,
    customers_known,
    replacement,
    time_range,
)
from aggregator.store.tables.corrections import Corrected, correct
from aggregator.store.tables.event_tables import store_system_event
from aggregator.store.tables.ledger_tables import Ledgers
from meters.corrections import (
    AMENDED,
    MAX_FILTERED,
    REPLACED,
    VOIDED,
    Amendment,
    EventReplace,
    VoidRequest,
)
from meters.errors import FieldError, ValidationFailed
from meters.events import Event

__all__ = ["Replaced", "Voided", "amend_job", "record", "replace_job", "void_job"]


@dataclass(frozen=True, slots=True)
class Voided:
    """What a void did: the events voided (ids), and what it named that no current event of
    the organization is (already voided, another organization's, never stored)."""

    voided: int
    ids: list[str]
    not_found: list[str]


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
        ledgers = tx.live.feature(Ledgers)
        where, params = _selected(tx.con, organization_id, request, through_seq, ledgers)
        if request.filter is not None:
            _at_most(tx.con, organization_id, where, params, MAX_FILTERED)
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
        reason, everywhere = request.reason, request.filter is None
        record(tx, organization_id, VOIDED, request_id, now_us, actor, reason, done, {}, everywhere)
        return Voided(len(done.voided_ids), done.voided_ids, [n for n in named if n not in found])

    return job


def _at_most(
    con: duckdb.DuckDBPyConnection, organization_id: str, where: str, params: list[Any], most: int
) -> None:
    """Refuse a filter matching more than `most` current events (before any write)."""
    found = con.execute(
        "SELECT count(*) FROM events WHERE organization_id = ?::UUID AND source = 'user'"  # noqa: S608 - fixed text, values bound
        f" AND ({where})",
        [organization_id, *params],
    ).fetchall()[0][0]
    if found > most:
        raise ValidationFailed(
            [
                FieldError(
                    "value_error",
                    ("body", "filter"),
                    f"the filter matches {found} events; a void may match at most {most}:"
                    " narrow it (a time range, a name)",
                    None,
                )
            ]
        )


def _selected(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    request: VoidRequest,
    through_seq: int | None,
    ledgers: Ledgers,
) -> tuple[str, list[Any]]:
    """The condition on `events` of what `request` names (a filter's customer refused where
    another shard holds it)."""
    if request.ids is not None:
        return "id IN (SELECT unnest(?::UUID[]))", [[str(i) for i in request.ids]]
    if request.external_ids is not None:
        return "external_id IN (SELECT unnest(?::VARCHAR[]))", [request.external_ids]
    chosen = request.filter
    assert chosen is not None
    clauses, params, _ = customer_clause(
        con, organization_id, chosen.customer_id, chosen.external_customer_id, ledgers
    )
    if chosen.name is not None:
        clauses.append("name = ?")
        params.append(chosen.name)
    clauses += time_range(chosen.start_timestamp, chosen.end_timestamp, params)
    if through_seq is not None:
        clauses.append("seq <= ?")
        params.append(through_seq)
    return " AND ".join(clauses), params


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
        customers_known(con, organization_id, [event], ("body",))
        version = _version(con, event_id) + 1
        done = correct(
            tx,
            organization_id,
            "id = ?::UUID",
            [event_id],
            applied_table(organization_id, [event], now_us),
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
        record(tx, organization_id, AMENDED, request_id, now_us, actor, reason, done, extra)
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
    another event holds (not one this range voids) are duplicates, left out
    (`correction_scope.replacement`); one whose external id the range voids is that event's
    next version. What it changed is read before and after it, in its transaction
    (`correction_reads`)."""

    def job(tx: Tx) -> Replaced:
        con = tx.con
        chosen = replacement(con, organization_id, request, events, tx.live.feature(Ledgers))
        usage_of = usage_in(tx.live)
        was = Before.read(con, usage_of, organization_id, chosen, now_us)
        reason = request.reason or "replaced"
        done = correct(
            tx,
            organization_id,
            chosen.where,
            chosen.params,
            applied_table(organization_id, chosen.kept, now_us),
            request_id=request_id,
            reason=reason,
            now_us=now_us,
        )
        _next_versions(con, organization_id, chosen.kept, _new_ids(con, done), chosen.replaced)
        extra = {
            "start_timestamp": chosen.start_us,
            "end_timestamp": chosen.end_us,
        }
        everywhere = chosen.subjects is None
        record(
            tx,
            organization_id,
            REPLACED,
            request_id,
            now_us,
            actor,
            reason,
            done,
            extra,
            everywhere,
        )
        meters, consumed = was.applied(con, usage_of, chosen, now_us)
        return Replaced(
            len(done.voided_ids), done.inserted, chosen.duplicates, False, meters, consumed
        )

    return job


# ---- helpers -------------------------------------------------------------------------------


def _new_ids(con: duckdb.DuckDBPyConnection, done: Corrected) -> list[str]:
    rows = con.execute(
        "SELECT id::VARCHAR FROM all_events WHERE seq >= ? AND seq < ? ORDER BY seq",
        [done.first_seq, done.first_seq + done.inserted],
    ).fetchall()
    return [str(r[0]) for r in rows]


def _next_versions(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    events: Sequence[Event],
    new_ids: Sequence[str],
    replaced: Mapping[str, str],
) -> None:
    """Each of `events` (stored as `new_ids`) whose external id is a key of `replaced` is the
    next version of the event `replaced` names by it."""
    pairs = [
        (new_id, replaced[e.external_id])
        for e, new_id in zip(events, new_ids, strict=True)
        if e.external_id is not None and e.external_id in replaced
    ]
    if pairs:
        con.execute(
            "INSERT INTO event_versions"
            " SELECT n.id, ?::UUID, n.replaces, coalesce(v.version, 1) + 1"
            " FROM (SELECT unnest(?::UUID[]) AS id, unnest(?::UUID[]) AS replaces) n"
            " LEFT JOIN event_versions v ON v.id = n.replaces",
            [organization_id, [p[0] for p in pairs], [p[1] for p in pairs]],
        )


def _version(con: duckdb.DuckDBPyConnection, event_id: str) -> int:
    row = first_row(con, "SELECT version FROM event_versions WHERE id = ?::UUID", [event_id])
    return 1 if row is None else int(row[0])


def record(
    tx: Tx,
    organization_id: str,
    name: str,
    request_id: str,
    now_us: int,
    actor: str | None,
    reason: str,
    done: Corrected,
    extra: Mapping[str, Any],
    everywhere: bool = False,
    *,
    voided: int | None = None,
) -> None:
    """The request's system event and webhook event (`name`). A shard of several records
    those of an organization-wide correction (`everywhere`: every shard applies it to its own
    customers) only where it changed something: one changing nothing there says nothing
    there. `voided`: how many it voided, where `done` names only the first (a void job's)."""
    con, live = tx.con, tx.live
    if everywhere and live.feature(Ledgers).sharded and not (done.voided_ids or done.inserted):
        return
    metadata = {
        "reason": reason,
        "actor": actor,
        "request_id": request_id,
        "voided": len(done.voided_ids) if voided is None else voided,
        "inserted": done.inserted,
        # The first ids only: a void may name up to a million.
        "event_ids": done.voided_ids[:100],
        **extra,
    }
    store_system_event(con, live, organization_id, None, name, metadata, now_us, now_us, request_id)
    # A replacement voids too: its endpoints take it as `event.voided`, with what it inserted.
    kind = AMENDED if name == AMENDED else VOIDED
    data = {"organization_id": organization_id, "type": name, **metadata}
    webhook_id = derived_id("webhook-event", organization_id, request_id, kind)
    webhook_tables.enqueue_many(con, live, organization_id, kind, [(webhook_id, data)], now_us)
