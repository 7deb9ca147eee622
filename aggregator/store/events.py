"""SQL for events: the batched insert with dedupe, and the reads behind `/v1/events`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from aggregator.store.writer import Batchable, Outcome
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
        # fetchall() closes the result: an open result set blocks DuckDB's checkpoints.
        rows = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchall()
        return cls(int(rows[0][0]))


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: jobs are dict keys
class IngestJob(Batchable[IngestResult]):
    """Store one request's validated events; many requests' jobs run as one batch."""

    organization_id: str
    events: Sequence[Event]
    ingested_at_us: int
    seq: SequenceCounter

    @classmethod
    def run_batch(cls, con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]) -> list[Outcome]:
        rejections = _unknown_customers(con, jobs)
        accepted = [job for job in jobs if job not in rejections]
        fresh = _dedupe(con, accepted)
        rows = [(job, event) for job in accepted for event in fresh[job]]
        if rows:
            _insert(con, rows, jobs[0].seq)
        return [
            (False, rejections[job])
            if job in rejections
            else (True, IngestResult(len(fresh[job]), len(job.events) - len(fresh[job])))
            for job in jobs
        ]


def _unknown_customers(
    con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]
) -> dict[IngestJob, ValidationFailed]:
    """Events naming a `customer_id` need that customer in their organization (Polar's rule)."""
    wanted = {e.customer_id for job in jobs for e in job.events if e.customer_id is not None}
    if not wanted:
        return {}
    known = set(
        con.execute(
            "SELECT organization_id::VARCHAR, id::VARCHAR FROM customers"
            " WHERE id IN (SELECT unnest(?::UUID[]))",
            [sorted(wanted)],
        ).fetchall()
    )
    rejections: dict[IngestJob, ValidationFailed] = {}
    for job in jobs:
        errors = [
            FieldError(
                "customer_id",
                ("body", "events", i, "customer_id"),
                "Customer not found.",
                e.customer_id,
            )
            for i, e in enumerate(job.events)
            if e.customer_id is not None and (job.organization_id, e.customer_id) not in known
        ]
        if errors:
            rejections[job] = ValidationFailed(errors, business=True)
    return rejections


def _dedupe(con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]) -> dict[IngestJob, list[Event]]:
    """Per job, the events to store: those without external_id, and the first occurrence (in
    submission order) of each (organization, external_id) never stored before."""
    first: dict[tuple[str, str], Event] = {}
    for job in jobs:
        for event in job.events:
            if event.external_id is not None:
                first.setdefault((job.organization_id, event.external_id), event)
    new: set[tuple[str, str]] = set()
    if first:
        keys = pa.table(
            {"organization_id": [k[0] for k in first], "external_id": [k[1] for k in first]}
        )
        con.register("_batch_keys", keys)
        try:
            new = set(
                con.execute(
                    "INSERT INTO event_keys SELECT organization_id::UUID, external_id"
                    " FROM _batch_keys ON CONFLICT DO NOTHING"
                    " RETURNING organization_id::VARCHAR, external_id"
                ).fetchall()
            )
        finally:
            con.unregister("_batch_keys")
    return {
        job: [
            e
            for e in job.events
            if e.external_id is None
            or (
                (job.organization_id, e.external_id) in new
                and first[(job.organization_id, e.external_id)] is e
            )
        ]
        for job in jobs
    }


def _insert(
    con: duckdb.DuckDBPyConnection, rows: list[tuple[IngestJob, Event]], seq: SequenceCounter
) -> None:
    dumps = orjson.dumps
    events = [e for _, e in rows]
    table = pa.table(
        {
            "seq": pa.array(seq.take(len(rows)), pa.int64()),
            "organization_id": [job.organization_id for job, _ in rows],
            "name": [e.name for e in events],
            "timestamp": pa.array([e.timestamp_us for e in events], _TS),
            "ingested_at": pa.array([job.ingested_at_us for job, _ in rows], _TS),
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
            " SELECT seq, organization_id::UUID, name, timestamp, ingested_at, customer_id::UUID,"
            " external_customer_id, external_member_id, external_id, parent_id, metadata,"
            " cost_amount::DECIMAL(17, 12) FROM _batch_events"
        )
    finally:
        con.unregister("_batch_events")
    _record_children(con, rows)
    _record_subjects(con, rows)


def _record_children(con: duckdb.DuckDBPyConnection, rows: list[tuple[IngestJob, Event]]) -> None:
    counts: dict[tuple[str, str], int] = {}
    for job, e in rows:
        if e.parent_id is not None:
            key = (job.organization_id, e.parent_id)
            counts[key] = counts.get(key, 0) + 1
    if counts:
        con.execute(
            "INSERT INTO event_children SELECT unnest($orgs)::UUID, unnest($refs), unnest($counts)"
            " ON CONFLICT DO UPDATE SET children = children + excluded.children",
            {
                "orgs": [k[0] for k in counts],
                "refs": [k[1] for k in counts],
                "counts": list(counts.values()),
            },
        )


def _record_subjects(con: duckdb.DuckDBPyConnection, rows: list[tuple[IngestJob, Event]]) -> None:
    first: dict[tuple[str, str], int] = {}
    for job, e in rows:
        subject = f"id:{e.customer_id}" if e.customer_id else f"ext:{e.external_customer_id}"
        key = (job.organization_id, subject)
        if e.timestamp_us < first.get(key, e.timestamp_us + 1):
            first[key] = e.timestamp_us
    con.execute(
        "INSERT INTO event_subjects"
        " SELECT unnest($orgs)::UUID, unnest($subjects), make_timestamptz(unnest($ts))"
        " ON CONFLICT DO UPDATE"
        " SET first_timestamp = least(first_timestamp, excluded.first_timestamp)",
        {
            "orgs": [k[0] for k in first],
            "subjects": [k[1] for k in first],
            "ts": list(first.values()),
        },
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
