"""SQL for events: the batched insert with dedupe, and the reads behind `/v1/events`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.meter_sql import member_pointer
from aggregator.store.meters import MeterRow, apply_isolated, meters_of
from aggregator.store.rows import first_row
from aggregator.store.writer import Batchable, Outcome
from meters.errors import FieldError, ValidationFailed
from meters.events import COLUMNS

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
    """Store one request's validated events (`columns.SCHEMA`); a group's jobs run as one
    batch, with no per-event Python beyond deciding duplicates."""

    organization_id: str
    events: pa.Table
    ingested_at_us: int
    seq: SequenceCounter

    @classmethod
    def run_batch(cls, con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]) -> list[Outcome]:
        rejections = _unknown_customers(con, jobs)
        accepted = [job for job in jobs if job not in rejections]
        kept: dict[IngestJob, int] = {}
        if accepted:
            batch = pa.concat_tables([_with_context(job) for job in accepted])
            batch = batch.append_column(
                "seq", pa.array(jobs[0].seq.take(batch.num_rows), pa.int64())
            )
            stored = insert_new(con, batch)
            offset = 0
            for job in accepted:
                rows = job.events.num_rows
                kept[job] = pc.sum(pc.cast(stored.slice(offset, rows), pa.int64())).as_py() or 0
                offset += rows
        return [
            (False, rejections[job])
            if job in rejections
            else (True, IngestResult(kept[job], job.events.num_rows - kept[job]))
            for job in jobs
        ]


def _with_context(job: IngestJob) -> pa.Table:
    n = job.events.num_rows
    table = job.events.append_column(
        "organization_id", pa.array([job.organization_id] * n, pa.string())
    )
    table = table.append_column("ingested_at", pa.array([job.ingested_at_us] * n, _TS))
    return table.append_column("source", pa.array(["user"] * n, pa.string()))


def _unknown_customers(
    con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]
) -> dict[IngestJob, ValidationFailed]:
    """Events naming a `customer_id` need that customer in their organization (Polar's rule)."""
    named = {job: job.events.column("customer_id") for job in jobs}
    named = {job: column for job, column in named.items() if column.null_count < len(column)}
    if not named:
        return {}
    known = known_customers(
        con, sorted({c for column in named.values() for c in column.to_pylist() if c})
    )
    rejections: dict[IngestJob, ValidationFailed] = {}
    for job, column in named.items():
        errors = [
            FieldError(
                "customer_id", ("body", "events", i, "customer_id"), "Customer not found.", c
            )
            for i, c in enumerate(column.to_pylist())
            if c is not None and (job.organization_id, c) not in known
        ]
        if errors:
            rejections[job] = ValidationFailed(errors, business=True)
    return rejections


def known_customers(
    con: duckdb.DuckDBPyConnection, customer_ids: list[str]
) -> set[tuple[str, str]]:
    """(organization id, customer id) of those of `customer_ids` that exist."""
    if not customer_ids:
        return set()
    rows = con.execute(
        "SELECT organization_id::VARCHAR, id::VARCHAR FROM customers"
        " WHERE id IN (SELECT unnest(?::UUID[]))",
        [customer_ids],
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


def _first_keyed(batch: pa.Table) -> pa.Table:
    """The first (lowest seq: submission order) row of each (organization, external_id) in the
    batch. Vectorized: no per-event Python."""
    keyed = batch.filter(pc.is_valid(batch.column("external_id")))
    firsts = keyed.group_by(["organization_id", "external_id"], use_threads=False).aggregate(
        [("seq", "min")]
    )
    return keyed.filter(pc.is_in(keyed.column("seq"), value_set=firsts.column("seq_min")))


# The event's columns (`meters.events.COLUMNS`) as the table stores them.
_CASTS = {"customer_id": "::UUID", "cost_amount": "::DECIMAL(17, 12)"}
_INSERT_EVENTS = (
    f"INSERT INTO events (seq, organization_id, ingested_at, {', '.join(COLUMNS.names)})"
    " SELECT seq, organization_id::UUID, ingested_at,"
    f" {', '.join(name + _CASTS.get(name, '') for name in COLUMNS.names)} FROM _batch_events"
)


def insert_new(con: duckdb.DuckDBPyConnection, batch: pa.Table) -> pa.BooleanArray:
    """Store the batch's new events; return which rows were stored. A row is a duplicate when
    an earlier row of the batch, or a stored event, has its (organization, external_id)."""
    unkeyed = batch.filter(pc.is_null(batch.column("external_id")))
    keyed = _first_keyed(batch)
    stored_seqs: list[int] = []
    # Two statements: within one ON CONFLICT insert, DuckDB treats rows whose key is NULL as
    # conflicting with each other (it drops all but one), so events without an external_id
    # never go through ON CONFLICT.
    if unkeyed.num_rows:
        con.register("_batch_events", unkeyed)
        try:
            con.execute(_INSERT_EVENTS)
        finally:
            con.unregister("_batch_events")
    if keyed.num_rows:
        con.register("_batch_events", keyed)
        try:
            rows = con.execute(_INSERT_EVENTS + " ON CONFLICT DO NOTHING RETURNING seq").fetchall()
        finally:
            con.unregister("_batch_events")
        stored_seqs = [row[0] for row in rows]
    stored = pc.or_(
        pc.is_null(batch.column("external_id")),
        pc.is_in(batch.column("seq"), value_set=pa.array(stored_seqs, pa.int64())),
    )
    new = batch.filter(stored)
    if new.num_rows:
        con.register("_batch_new", new)
        try:
            _record_links(con, has_parents=new.column("parent_id").null_count < new.num_rows)
            organizations = [str(o) for o in pc.unique(new.column("organization_id")).to_pylist()]
            by_organization: dict[str, list[MeterRow]] = {}
            for meter in meters_of(con, organizations):
                by_organization.setdefault(meter.organization_id, []).append(meter)
            for organization, meters in by_organization.items():
                apply_isolated(
                    con, meters, "_batch_new", "organization_id = ?", [organization], data=new
                )
        finally:
            con.unregister("_batch_new")
    return stored


def _record_links(con: duckdb.DuckDBPyConnection, *, has_parents: bool) -> None:
    """Parent child counts and customers' first event times, from the registered `_batch_new`."""
    if has_parents:
        con.execute(
            "INSERT INTO event_children SELECT organization_id::UUID, parent_id, count(*)"
            " FROM _batch_new WHERE parent_id IS NOT NULL GROUP BY ALL"
            " ON CONFLICT DO UPDATE SET children = children + excluded.children"
        )
    # Subjects are spelled as the readers look them up: 'id:<uuid>' or 'ext:<external id>'.
    con.execute(
        "INSERT INTO event_subjects"
        " SELECT organization_id::UUID,"
        " CASE WHEN customer_id IS NOT NULL THEN 'id:' || customer_id"
        " ELSE 'ext:' || external_customer_id END, min(timestamp)"
        " FROM _batch_new GROUP BY ALL ON CONFLICT DO UPDATE"
        " SET first_timestamp = least(first_timestamp, excluded.first_timestamp)"
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
    # A compiled meter: events its filter matches and its aggregation takes (SQL, params).
    meter: tuple[str, list[Any]] | None = None
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
        # The key is bound as a JSON pointer (any member name), never spliced into SQL.
        clauses.append("json_extract_string(metadata, ?) IN (SELECT unnest(?::VARCHAR[]))")
        params.extend([member_pointer(key), list(values)])
    if q.meter is not None:
        clauses.append(q.meter[0])
        params.extend(q.meter[1])
    if q.parent_id is not None:
        clauses.append(
            "(parent_id = ? OR parent_id IN (SELECT external_id FROM events"
            " WHERE organization_id = ? AND id::VARCHAR = ? AND external_id IS NOT NULL))"
        )
        params.extend([q.parent_id, organization_id, q.parent_id])
    return " AND ".join(clauses), params


def list_events(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    query: EventQuery,
    *,
    limit: int,
    offset: int,
) -> tuple[list[EventRow], int]:
    where, params = _where(organization_id, query)
    total = int(con.execute(f"SELECT count(*) FROM events WHERE {where}", params).fetchall()[0][0])
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
    row = first_row(
        con,
        f"SELECT {EVENT_COLUMNS} FROM events WHERE organization_id = ? AND id = ?::UUID",
        [organization_id, event_id],
    )
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
