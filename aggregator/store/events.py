"""SQL for events: the batched insert with dedupe, and the reads behind `/v1/events`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from meters.errors import FieldError, ValidationFailed
from meters.events import Event

_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class IngestResult:
    inserted: int
    duplicates: int


class SequenceCounter:
    """Ingestion order numbers; only the writer thread draws from it."""

    def __init__(self, start: int) -> None:
        self._next = itertools.count(start)

    def take(self, n: int) -> list[int]:
        return [next(self._next) for _ in range(n)]

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection) -> SequenceCounter:
        row = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()
        return cls(int(row[0]) if row else 1)


def ingest_job(
    organization_id: str, events: Sequence[Event], ingested_at_us: int, seq: SequenceCounter
) -> Any:
    """A writer job storing `events` for the organization; see `writer.py` for the contract."""

    def job(con: duckdb.DuckDBPyConnection) -> IngestResult:
        _check_customers(con, organization_id, events)
        fresh = _dedupe(con, organization_id, events)
        if fresh:
            _insert(con, organization_id, fresh, ingested_at_us, seq)
        return IngestResult(len(fresh), len(events) - len(fresh))

    return job


def _check_customers(
    con: duckdb.DuckDBPyConnection, organization_id: str, events: Sequence[Event]
) -> None:
    wanted = {e.customer_id for e in events if e.customer_id is not None}
    if not wanted:
        return
    rows = con.execute(
        "SELECT id::VARCHAR FROM customers WHERE organization_id = ?"
        " AND id IN (SELECT unnest(?::UUID[]))",
        [organization_id, sorted(wanted)],
    ).fetchall()
    missing = wanted - {r[0] for r in rows}
    if missing:
        raise ValidationFailed(
            [
                FieldError(
                    "customer_id",
                    ("body", "events", i, "customer_id"),
                    "Customer not found.",
                    e.customer_id,
                )
                for i, e in enumerate(events)
                if e.customer_id in missing
            ],
            business=True,
        )


def _dedupe(
    con: duckdb.DuckDBPyConnection, organization_id: str, events: Sequence[Event]
) -> list[Event]:
    """Events to store: without external_id, or the first with an external_id never seen."""
    first: dict[str, Event] = {}
    for event in events:
        if event.external_id is not None and event.external_id not in first:
            first[event.external_id] = event
    if not first:
        return list(events)
    con.register("_batch_keys", pa.table({"external_id": list(first)}))
    try:
        new = {
            r[0]
            for r in con.execute(
                "INSERT INTO event_keys SELECT ?, external_id FROM _batch_keys"
                " ON CONFLICT DO NOTHING RETURNING external_id",
                [organization_id],
            ).fetchall()
        }
    finally:
        con.unregister("_batch_keys")
    return [
        e
        for e in events
        if e.external_id is None or (e.external_id in new and first[e.external_id] is e)
    ]


def _insert(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    events: list[Event],
    ingested_at_us: int,
    seq: SequenceCounter,
) -> None:
    dumps = orjson.dumps
    table = pa.table(
        {
            "seq": pa.array(seq.take(len(events)), pa.int64()),
            "name": [e.name for e in events],
            "timestamp": pa.array([e.timestamp_us for e in events], _TS),
            "customer_id": [e.customer_id for e in events],
            "external_customer_id": [e.external_customer_id for e in events],
            "external_member_id": [e.external_member_id for e in events],
            "external_id": [e.external_id for e in events],
            "parent_id": [e.parent_id for e in events],
            "metadata": [dumps(e.metadata).decode() for e in events],
            "cost_amount": [e.cost_amount for e in events],
        }
    )
    con.register("_batch_events", table)
    try:
        con.execute(
            "INSERT INTO events (seq, organization_id, name, timestamp, ingested_at, customer_id,"
            " external_customer_id, external_member_id, external_id, parent_id, metadata,"
            " cost_amount)"
            " SELECT seq, $org, name, timestamp, make_timestamptz($ingested), customer_id::UUID,"
            " external_customer_id, external_member_id, external_id, parent_id, metadata,"
            " cost_amount::DECIMAL(17, 12) FROM _batch_events",
            {"org": organization_id, "ingested": ingested_at_us},
        )
    finally:
        con.unregister("_batch_events")
    _record_children(con, organization_id, events)
    _record_subjects(con, organization_id, events)


def _record_children(
    con: duckdb.DuckDBPyConnection, organization_id: str, events: list[Event]
) -> None:
    counts: dict[str, int] = {}
    for e in events:
        if e.parent_id is not None:
            counts[e.parent_id] = counts.get(e.parent_id, 0) + 1
    if counts:
        con.execute(
            "INSERT INTO event_children SELECT $org, unnest($refs), unnest($counts)"
            " ON CONFLICT DO UPDATE SET children = children + excluded.children",
            {"org": organization_id, "refs": list(counts), "counts": list(counts.values())},
        )


def _record_subjects(
    con: duckdb.DuckDBPyConnection, organization_id: str, events: list[Event]
) -> None:
    first: dict[str, int] = {}
    for e in events:
        key = f"id:{e.customer_id}" if e.customer_id else f"ext:{e.external_customer_id}"
        if e.timestamp_us < first.get(key, e.timestamp_us + 1):
            first[key] = e.timestamp_us
    con.execute(
        "INSERT INTO event_subjects SELECT $org, unnest($keys), make_timestamptz(unnest($ts))"
        " ON CONFLICT DO UPDATE"
        " SET first_timestamp = least(first_timestamp, excluded.first_timestamp)",
        {"org": organization_id, "keys": list(first), "ts": list(first.values())},
    )


# ---- reads ---------------------------------------------------------------------------------

EVENT_COLUMNS = (
    "id::VARCHAR, epoch_us(timestamp), customer_id::VARCHAR, external_customer_id,"
    " external_member_id, parent_id, name, source, metadata, external_id"
)


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    timestamp_us: int
    customer_id: str | None
    external_customer_id: str | None
    external_member_id: str | None
    parent_id: str | None
    name: str
    source: str
    metadata: dict[str, Any]
    external_id: str | None
    child_count: int = 0


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
    descending: bool = True


def _where(organization_id: str, q: EventQuery) -> tuple[str, list[Any]]:
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
        # The key is bound as a JSON path (quoted member name), never spliced into SQL.
        clauses.append("json_extract_string(metadata, ?) IN (SELECT unnest(?::VARCHAR[]))")
        params.extend([json_path(key), list(values)])
    if q.parent_id is not None:
        clauses.append(
            "(parent_id = ? OR parent_id IN (SELECT external_id FROM events"
            " WHERE organization_id = ? AND id::VARCHAR = ? AND external_id IS NOT NULL))"
        )
        params.extend([q.parent_id, organization_id, q.parent_id])
    return " AND ".join(clauses), params


def json_path(key: str) -> str:
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_events(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    query: EventQuery,
    *,
    limit: int,
    offset: int,
) -> tuple[list[EventRow], int]:
    where, params = _where(organization_id, query)
    total_row = con.execute(f"SELECT count(*) FROM events WHERE {where}", params).fetchone()
    total = int(total_row[0]) if total_row else 0
    order = "DESC" if query.descending else "ASC"
    rows = con.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE {where}"
        f" ORDER BY timestamp {order}, seq {order} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return _with_children(con, organization_id, [_row(r) for r in rows]), total


def get_event(
    con: duckdb.DuckDBPyConnection, organization_id: str, event_id: str
) -> EventRow | None:
    row = con.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE organization_id = ? AND id = ?::UUID",
        [organization_id, event_id],
    ).fetchone()
    if row is None:
        return None
    return _with_children(con, organization_id, [_row(row)])[0]


def _row(r: tuple[Any, ...]) -> EventRow:
    return EventRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], orjson.loads(r[8]), r[9])


def _with_children(
    con: duckdb.DuckDBPyConnection, organization_id: str, rows: list[EventRow]
) -> list[EventRow]:
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
    return [
        replace(r, child_count=counts.get(r.id, 0) + counts.get(r.external_id or "", 0))
        for r in rows
    ]


def subjects_first_timestamp(
    con: duckdb.DuckDBPyConnection, organization_id: str, subjects: list[str]
) -> dict[str, int]:
    if not subjects:
        return {}
    return dict(
        con.execute(
            "SELECT subject, epoch_us(first_timestamp) FROM event_subjects"
            " WHERE organization_id = ? AND subject IN (SELECT unnest(?::VARCHAR[]))",
            [organization_id, subjects],
        ).fetchall()
    )
