"""Events: applying ingest requests (`IngestJob`), and the reads behind `/v1/events`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import duckdb
import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.meter_sql import member_pointer
from aggregator.store.base.rows import first_row, is_uuid
from aggregator.store.machinery import ingest_log
from aggregator.store.machinery.ingest_log import with_origin
from aggregator.store.machinery.rollups import Prepared
from aggregator.store.machinery.writer import Batchable, Outcome, Tx
from meters.errors import FieldError, ValidationFailed

if TYPE_CHECKING:
    pass


@dataclass(frozen=True, slots=True)
class IngestResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: jobs are dict keys
class IngestJob(Batchable[IngestResult]):
    """Apply one request's validated events (`meters.events.COLUMNS`); a group's jobs run as
    one batch, with no per-event Python. Each request's new events are logged (`ingest_log`:
    durable when the group commits) and applied (`Live.apply`); the flusher stores them later.
    `body` is the events as `ingest_log.encode` writes them, if the caller has it already."""

    organization_id: str
    events: pa.Table
    ingested_at_us: int
    body: bytes | None = None
    # Its events evaluated for the organization's meters before the writer took the job
    # (`Store.prepare`): the writer then only checks that the meters are still those.
    prepared: Prepared | None = None
    waits_for_pending: ClassVar[bool] = False

    @classmethod
    def run_batch(cls, tx: Tx, jobs: list[IngestJob]) -> list[Outcome]:
        con, live = tx.con, tx.live
        rejections = _unknown_customers(con, jobs)
        accepted = [job for job in jobs if job not in rejections]
        kept: dict[IngestJob, int] = {}
        if accepted:
            batch = pa.concat_tables(
                [with_origin(j.events, j.organization_id, j.ingested_at_us) for j in accepted]
            )
            admitted = live.admit(con, batch)
            keep = admitted.keep
            first = admitted.first_seq
            logged: list[ingest_log.Logged] = []
            offset = 0
            for job in accepted:
                mine = keep.slice(offset, job.events.num_rows)
                kept[job] = mine.true_count
                if kept[job]:
                    dropped = pc.indices_nonzero(pc.invert(mine)).to_numpy().tolist()
                    body = job.body or ingest_log.encode(job.events)
                    logged.append(
                        ingest_log.Logged(
                            first,
                            job.organization_id,
                            job.ingested_at_us,
                            first,
                            first + kept[job] - 1,
                            dropped,
                            body,
                        )
                    )
                first += kept[job]
                offset += job.events.num_rows
            live.log_requests(logged)
            live.apply(
                con,
                admitted.events,
                fingerprints=admitted.fingerprints,
                log_id=logged[-1].id if logged else None,
                prepared=_placed(accepted, admitted.seqs()),
            )
        return [
            (False, rejections[job])
            if job in rejections
            else (True, IngestResult(kept[job], job.events.num_rows - kept[job]))
            for job in jobs
        ]


def _placed(jobs: list[IngestJob], seqs: npt.NDArray[np.int64]) -> dict[str, Prepared]:
    """Per organization, its jobs' prepared contributions with the seqs their events took
    (`seqs`: per row of the jobs' events, in order), where every job of it has them."""
    parts: dict[str, list[Prepared | None]] = {}
    offset = 0
    for job in jobs:
        n = job.events.num_rows
        mine = job.prepared and job.prepared.placed(seqs[offset : offset + n])
        parts.setdefault(job.organization_id, []).append(mine)
        offset += n
    placed = {}
    for organization, found in parts.items():
        ready = [p for p in found if p is not None]
        if len(ready) == len(found) and (joined := Prepared.joined(ready)) is not None:
            placed[organization] = joined
    return placed


@dataclass(frozen=True, slots=True)
class Replay:
    """A writer job: apply again, exactly as it was, what the ingest log holds (at open)."""

    logged: ingest_log.Logged
    waits_for_pending: ClassVar[bool] = False

    def __call__(self, tx: Tx) -> None:
        tx.live.apply(tx.con, self.logged.applied(), log_id=self.logged.id)


def _unknown_customers(
    con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]
) -> dict[IngestJob, ValidationFailed]:
    """The requests with events breaking the customer rule (`missing_customers`)."""
    named = {job: job.events.column("customer_id").to_pylist() for job in jobs}
    named = {job: ids for job, ids in named.items() if any(ids)}
    rows = [(job.organization_id, c) for job, ids in named.items() for c in ids]
    missing = iter(missing_customers(con, rows))
    rejections: dict[IngestJob, ValidationFailed] = {}
    for job, ids in named.items():
        errors = [
            FieldError(
                "customer_id", ("body", "events", i, "customer_id"), "Customer not found.", c
            )
            for i, c in enumerate(ids)
            if next(missing)
        ]
        if errors:
            rejections[job] = ValidationFailed(errors, business=True)
    return rejections


def missing_customers(
    con: duckdb.DuckDBPyConnection, rows: Sequence[tuple[str, str | None]]
) -> list[bool]:
    """For each (organization id, customer id) of an event, whether it breaks the rule that an
    event naming a `customer_id` needs that customer in its organization (Polar's). One rule
    for the embedded path (checked in the write transaction) and the consumer's (checked
    before it, so that the rows it dead-letters are sent before their offsets commit)."""
    ids = sorted({c for _, c in rows if c})
    known: set[tuple[str, str]] = set()
    if ids:
        found = con.execute(
            "SELECT organization_id::VARCHAR, id::VARCHAR FROM customers"
            " WHERE id IN (SELECT unnest(?::UUID[]))",
            [ids],
        ).fetchall()
        known = {(r[0], r[1]) for r in found}
    return [c is not None and (o, c) not in known for o, c in rows]


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
    # The parent's event id once an event with the id or external id the child named exists
    # (the stored column keeps the reference as sent); None before, or without a parent.
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
    total = int(
        con.execute(f"SELECT count(*) FROM events WHERE {where_sql}", params).fetchall()[0][0]  # noqa: S608 - fixed text, values bound
    )
    order = "DESC" if query.descending else "ASC"
    rows = con.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE {where_sql}"  # noqa: S608 - fixed text, values bound
        f" ORDER BY timestamp {order}, seq {order} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return _with_children(con, organization_id, [_row(r) for r in rows]), total


def get_event(
    con: duckdb.DuckDBPyConnection, organization_id: str, event_id: str
) -> EventRow | None:
    row = first_row(
        con,
        f"SELECT {EVENT_COLUMNS} FROM events WHERE organization_id = ? AND id = ?::UUID",  # noqa: S608 - fixed text, values bound
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
    return dict(
        con.execute(
            "SELECT subject, epoch_us(first_timestamp) FROM event_subjects"
            " WHERE organization_id = ? AND subject IN (SELECT unnest(?::VARCHAR[]))",
            [organization_id, subjects],
        ).fetchall()
    )
