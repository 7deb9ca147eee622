"""Events: the reads behind `/v1/events`, and the system events that writes store (applying
ingested events is `store.apply`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import duckdb
import orjson
import pyarrow as pa

from aggregator.store.base.ids import derived_id
from aggregator.store.base.rows import among, first_row, is_uuid
from aggregator.store.metering.meter_sql import member_pointer
from meters.corrections import NAMES as CORRECTIONS
from meters.events.schema import ID_FIELDS

if TYPE_CHECKING:
    from aggregator.store.engine.live import Live

__all__ = [
    "EventQuery",
    "EventRow",
    "Voiding",
    "event_keys",
    "get_event",
    "list_events",
    "store_system_event",
    "subjects_first_timestamp",
]


def store_system_event(
    con: duckdb.DuckDBPyConnection,
    live: Live,
    organization_id: str,
    customer_id: str | None,
    name: str,
    metadata: dict[str, Any],
    at_us: int,
    now_us: int,
    key: str,
) -> int:
    """Store a system event (a credit's, a reset's, a correction's) in the job's transaction
    (`Live.store_system_event`); its seq. Its id is derived from `key`, which names the write
    that made it (the same on every core that applies that write). Only in a job that waits
    for pending events."""
    seq = live.seq.reserve(1)
    utc = pa.timestamp("us", tz="UTC")
    text = pa.string()
    row = {
        "id": pa.array([derived_id("system-event", organization_id, key, name)], text),
        "name": pa.array([name], text),
        "timestamp": pa.array([at_us], pa.int64()).cast(utc),
        "customer_id": pa.array([customer_id], text),
        **{c: pa.nulls(1, text) for c in ID_FIELDS},
        "metadata": pa.array([orjson.dumps(metadata).decode()], text),
        "cost_amount": pa.nulls(1, text),
        "organization_id": pa.array([organization_id], text),
        "source": pa.array(["system"], text),
        "ingested_at": pa.array([now_us], pa.int64()).cast(utc),
        "seq": pa.array([seq], pa.int64()),
    }
    live.store_system_event(con, pa.table(row))
    return seq


# ---- reads ---------------------------------------------------------------------------------

EVENT_COLUMNS = (
    "id::VARCHAR, epoch_us(timestamp), customer_id::VARCHAR, external_customer_id,"
    " external_member_id, parent_id, name, source, metadata, external_id, seq"
)


@dataclass(frozen=True, slots=True)
class Voiding:
    """Why and when an event was voided (`tables.corrections`)."""

    at_us: int
    reason: str


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    timestamp_us: int
    customer_id: str | None
    external_customer_id: str | None
    external_member_id: str | None
    # The parent's event id once an event with the id or external id the child named exists
    # (the stored column keeps the reference as sent); None before, or without a parent.
    parent_id: str | None
    name: str
    source: str
    metadata: dict[str, Any]
    external_id: str | None
    child_count: int = 0
    seq: int = 0
    version: int = 1  # 2 and up: of a key amended or replaced (`correction_jobs`)
    voided: Voiding | None = None


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters of `GET /v1/events/`; customer filters are already resolved to both id kinds."""

    customer_ids: tuple[str, ...] = ()
    external_customer_ids: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    start_us: int | None = None
    end_us: int | None = None
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()
    parent_id: str | None = None
    # Roots (no parent) and their descendants down to this depth; with `parent_id`, that
    # event's descendants down to it. A child whose parent has not arrived is in neither.
    depth: int | None = None
    sources: tuple[str, ...] = ()
    # Polar's `query`: text in the name, source or metadata, or a customer it matched (ids,
    # external ids).
    search: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
    # Compiled conditions (SQL, params), all of which an event meets: a meter's (its filter
    # matches and its aggregation takes the event), a query's `filter`.
    conditions: tuple[tuple[str, list[Any]], ...] = ()
    descending: bool = True
    voided: bool = False  # voided events too (`all_events`), not only the current ones
    # The client names a Polar API version (polar-sdk does): no version has the corrections'
    # system events, which are then never listed.
    polar_version: bool = False


def where(organization_id: str, q: EventQuery) -> tuple[str, list[Any]]:
    """The condition on `events` rows that `q` selects, with its parameters."""
    clauses = ["organization_id = ?"]
    params: list[Any] = [organization_id]
    subject: list[str] = []
    if q.customer_ids:
        subject.append("customer_id IN (SELECT unnest(?::UUID[]))")
        params.append(list(q.customer_ids))
    if q.external_customer_ids:
        subject.append("external_customer_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(q.external_customer_ids))
    if subject:
        clauses.append("(" + " OR ".join(subject) + ")")
    if q.names:
        clauses.append("name IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(q.names))
    if q.start_us is not None:
        clauses.append("timestamp >= make_timestamptz(?)")
        params.append(q.start_us)
    if q.end_us is not None:
        clauses.append("timestamp <= make_timestamptz(?)")
        params.append(q.end_us)
    for key, values in q.metadata:
        # The key is bound as a JSON pointer (any member name), never spliced into SQL.
        clauses.append("json_extract_string(metadata, ?) IN (SELECT unnest(?::VARCHAR[]))")
        params.extend([member_pointer(key), list(values)])
    if q.sources:
        clauses.append("source IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(q.sources))
    if q.polar_version or (not q.voided and not set(q.names) & set(CORRECTIONS)):
        # Corrections' system events are meterline's own (polar-sdk loads no system event it
        # does not know): listed when asked for by name, or with the voided events, by a
        # client that names no Polar API version.
        clauses.append("NOT (source = 'system' AND name IN (SELECT unnest(?::VARCHAR[])))")
        params.append(list(CORRECTIONS))
    if q.search is not None:
        text, ids, external = q.search
        clauses.append(
            "(contains(lower(name), lower(?)) OR contains(lower(source), lower(?))"
            " OR contains(lower(metadata::VARCHAR), lower(?))"
            " OR customer_id IN (SELECT unnest(?::UUID[]))"
            " OR external_customer_id IN (SELECT unnest(?::VARCHAR[])))"
        )
        params.extend([text, text, text, list(ids), list(external)])
    for condition, condition_params in q.conditions:
        clauses.append(condition)
        params.extend(condition_params)
    if q.depth is not None:
        tree, tree_params = _tree_sql(organization_id, q.parent_id, q.depth)
        clauses.append(f"id IN ({tree})")
        params.extend(tree_params)
    elif q.parent_id is not None:
        clauses.append(
            "(parent_id = ? OR parent_id IN (SELECT external_id FROM events"
            " WHERE organization_id = ? AND id::VARCHAR = ? AND external_id IS NOT NULL))"
        )
        params.extend([q.parent_id, organization_id, q.parent_id])
    return " AND ".join(clauses), params


def _tree_sql(organization_id: str, anchor: str | None, depth: int) -> tuple[str, list[Any]]:
    """Ids of the roots and their descendants down to `depth` levels (or of `anchor`'s
    descendants, 1 to `depth` levels below it). A child names its parent by id or external id
    (the stored `parent_id` column): each level joins on both of its members' references.
    The level bound also ends any cycle of references."""
    if anchor is None:
        start = (
            "SELECT id, external_id, 0 FROM events WHERE organization_id = ? AND parent_id IS NULL"
        )
        start_params: list[Any] = [organization_id]
    else:
        start = (
            "SELECT id, external_id, 0 FROM events WHERE organization_id = ?"
            " AND (id::VARCHAR = ? OR external_id = ?)"
        )
        start_params = [organization_id, anchor, anchor]
    sql = (
        f"WITH RECURSIVE tree(id, external_id, level) AS ({start}"  # noqa: S608 - fixed text, values bound
        " UNION SELECT e.id, e.external_id, r.level + 1 FROM events e JOIN"
        " (SELECT unnest([t.id::VARCHAR, t.external_id]) AS ref, t.level FROM tree t"
        " WHERE t.level < ?) r ON e.parent_id = r.ref WHERE e.organization_id = ?)"
        " SELECT id FROM tree WHERE level >= ?"
    )
    return sql, [*start_params, depth, organization_id, 0 if anchor is None else 1]


def list_events(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    query: EventQuery,
    *,
    limit: int,
    offset: int,
) -> tuple[list[EventRow], int]:
    where_sql, params = where(organization_id, query)
    source = _source(query)
    total = int(
        con.execute(f"SELECT count(*) FROM {source} WHERE {where_sql}", params).fetchall()[0][0]  # noqa: S608 - fixed text, values bound
    )
    order = "DESC" if query.descending else "ASC"
    rows = con.execute(
        f"SELECT {EVENT_COLUMNS} FROM {source} WHERE {where_sql}"  # noqa: S608 - fixed text, values bound
        f" ORDER BY {_order(order)} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    listed = _with_children(con, organization_id, [_row(r) for r in rows])
    return _with_corrections(con, listed), total


def _source(query: EventQuery) -> str:
    """The current events, or every stored one (voided too)."""
    return "all_events" if query.voided else "events"


def event_keys(
    con: duckdb.DuckDBPyConnection, organization_id: str, query: EventQuery, limit: int
) -> tuple[list[tuple[int, int, str, int, str]], int]:
    """The first `limit` events' places in `list_events`' order (its sort keys: timestamp and
    ingest time in microseconds, source, order made, id), and how many there are in all."""
    where_sql, params = where(organization_id, query)
    order = "DESC" if query.descending else "ASC"
    source = _source(query)
    keys = con.execute(
        f"SELECT epoch_us(timestamp), epoch_us(ingested_at), source, {_MADE}, id::VARCHAR"  # noqa: S608 - fixed text, values bound
        f" FROM {source} WHERE {where_sql} ORDER BY {_order(order)} LIMIT ?",
        [*params, limit],
    ).fetchall()
    total = con.execute(f"SELECT count(*) FROM {source} WHERE {where_sql}", params).fetchall()  # noqa: S608 - fixed text, values bound
    return [(int(t), int(at), str(s), int(m), str(i)) for t, at, s, m, i in keys], int(total[0][0])


# A list's order: timestamp, ingest time, then id, the same in every deployment (a user
# event's id is derived from where it was first read); system events of one write (a plan's
# reset and credit) in the order it made them, as every core applying it does.
_MADE = "(CASE WHEN source = 'system' THEN seq ELSE 0 END)"


def _order(direction: str) -> str:
    return ", ".join(
        f"{c} {direction}" for c in ("timestamp", "ingested_at", "source", _MADE, "id")
    )


def get_event(
    con: duckdb.DuckDBPyConnection, organization_id: str, event_id: str
) -> EventRow | None:
    row = first_row(
        con,
        f"SELECT {EVENT_COLUMNS} FROM all_events WHERE organization_id = ? AND id = ?::UUID",  # noqa: S608 - fixed text, values bound
        [organization_id, event_id],
    )
    if row is None:
        return None
    return _with_corrections(con, _with_children(con, organization_id, [_row(row)]))[0]


def _row(r: tuple[Any, ...]) -> EventRow:
    return EventRow(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], orjson.loads(r[8]), r[9], seq=r[10]
    )


def _with_corrections(con: duckdb.DuckDBPyConnection, rows: list[EventRow]) -> list[EventRow]:
    """The rows with their versions, and whether each was voided (and why)."""
    if not rows:
        return rows
    versions = dict(
        con.execute(
            "SELECT id::VARCHAR, version FROM event_versions"
            " WHERE id IN (SELECT unnest(?::UUID[]))",
            [[r.id for r in rows]],
        ).fetchall()
    )
    voided = {
        int(seq): Voiding(int(at), str(reason))
        for seq, at, reason in con.execute(
            "SELECT seq, epoch_us(voided_at), reason FROM voided_events"
            " WHERE seq IN (SELECT unnest(?::BIGINT[]))",
            [[r.seq for r in rows]],
        ).fetchall()
    }
    return [replace(r, version=versions.get(r.id, 1), voided=voided.get(r.seq)) for r in rows]


def _with_children(
    con: duckdb.DuckDBPyConnection, organization_id: str, rows: list[EventRow]
) -> list[EventRow]:
    """The rows with their direct children counted (children name a parent by either id) and
    their parent references resolved to event ids."""
    refs = {r.id for r in rows} | {r.external_id for r in rows if r.external_id is not None}
    if not refs:
        return rows
    counts = dict(
        con.execute(
            "SELECT parent_ref, children FROM event_children WHERE organization_id = ?"
            " AND parent_ref IN (SELECT unnest(?::VARCHAR[]))",
            [organization_id, sorted(refs)],
        ).fetchall()
    )
    parents = _parents(con, organization_id, {r.parent_id for r in rows if r.parent_id})
    return [
        replace(
            r,
            parent_id=parents.get(r.parent_id) if r.parent_id else None,
            child_count=counts.get(r.id, 0) + counts.get(r.external_id or "", 0),
        )
        for r in rows
    ]


def _parents(
    con: duckdb.DuckDBPyConnection, organization_id: str, refs: set[str]
) -> dict[str, str]:
    """The event id each reference names: the event with that external id, else the event
    with that id (Polar's order)."""
    if not refs:
        return {}
    found = con.execute(
        "SELECT external_id, id::VARCHAR FROM events WHERE organization_id = ?"
        " AND external_id IN (SELECT unnest(?::VARCHAR[]))",
        [organization_id, sorted(refs)],
    ).fetchall()
    by_external = {r[0]: r[1] for r in found}
    ids = sorted(ref for ref in refs - by_external.keys() if is_uuid(ref))
    by_id = {}
    if ids:
        rows = con.execute(
            "SELECT id::VARCHAR FROM events WHERE organization_id = ?"
            " AND id IN (SELECT unnest(?::UUID[]))",
            [organization_id, ids],
        ).fetchall()
        by_id = {r[0]: r[0] for r in rows}
    return {**by_id, **by_external}


def subjects_first_timestamp(
    con: duckdb.DuckDBPyConnection, organization_id: str, subjects: list[str]
) -> dict[str, int]:
    if not subjects:
        return {}
    which, params = among("subject", subjects)  # a fourth of a semi join's time
    return dict(
        con.execute(
            "SELECT subject, epoch_us(first_timestamp) FROM event_subjects"  # noqa: S608 - fixed text, values bound
            f" WHERE organization_id = ? AND {which}",
            [organization_id, *params],
        ).fetchall()
    )
