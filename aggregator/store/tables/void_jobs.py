"""Voids by filter as jobs: `POST /v1/events/void` with a filter (up to `MAX_FILTERED` events)
is answered with a job, and the events are voided in steps, so that other tenants' writes go on
meanwhile. The protocol:

1. The write record (`event.void`, `create_job`) resolves the filter's customer to the
   references its events name, takes the last seq applied (`through_seq`: events sent after
   the request are never reached), counts the current events the filter matches up to it
   (more than `MAX_FILTERED`: refused, a 422 naming `filter`) and stores the job, running (done
   at once when nothing matches). The count may come with the record, made before off the
   writer (`counted`): the writer then counts only the events stored since, unless events were
   voided meanwhile.
2. Each step (`step_job`, a writer job) voids the matched events of the next window of seqs,
   from where the last step ended (`done_to`) up to a seq its caller chose, at most
   `through_seq`: what `corrections.correct` does to a selection, in one transaction, so that a
   voided event stops counting everywhere at its step and every read between steps is
   consistent (`Window` says how, at a cost that follows the events voided). Its markers name
   the job's request id and reason, with the job's time, whatever the steps' sizes, so that the
   voided events are the same whichever steps voided them. What a step reads is read first,
   off the writer (`plan`: with its markers written as a file of `voided_events`), and taken by
   the writer if nothing it depends on has changed since (`Plan.holds`); else read there (the
   same step either way, on every core).
3. The step that reaches `through_seq` ends the job (`done`), and stores its system event and
   webhook event (`event.voided`), as a void of one record does.

Before a job's first step its customer's rollups of the meters a step cannot take events from
(minimum, maximum, unique, points) are lifted out of the rollups' files into their base tables
(`to_lift`, `Store.lift`), where each step deletes and writes again those of its window's
buckets; a meter not lifted has its files written again by each step. Steps are the caller's
to take (`aggregator.background.voids`: in Kafka mode each is a journal group, so that every
core applies it at the same place).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import NotFound
from aggregator.store.base import subjects
from aggregator.store.base.arrays import numpy
from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.base.rows import among, first_row, registered
from aggregator.store.base.subjects import OF_EVENT
from aggregator.store.engine.compaction import LEDGER_TABLES
from aggregator.store.engine.segments import RELATIONS, ROLLUP_RELATIONS, Change, Segment
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering import groups, rollups
from aggregator.store.metering.rollups import BUCKET, Evaluated, kind
from aggregator.store.tables.correction_jobs import record
from aggregator.store.tables.correction_scope import customer_clause
from aggregator.store.tables.corrections import (
    SUBTRACTING,
    Corrected,
    evaluated_events,
    negated,
    settle,
)
from aggregator.store.tables.ledger_tables import Ledgers
from meters.corrections import MAX_FILTERED, VOIDED, VoidFilter, VoidRequest
from meters.errors import FieldError, ValidationFailed
from meters.times import datetime_to_us, us_to_datetime

__all__ = [
    "DONE",
    "RUNNING",
    "Lift",
    "Plan",
    "Step",
    "VoidJob",
    "counted",
    "create_job",
    "get_job",
    "matched_seqs",
    "plan",
    "running_jobs",
    "step_job",
    "to_lift",
]

RUNNING = "running"
DONE = "done"
_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, subject, request_id, reason, actor, filter,"
    " selection, through_seq, matched, voided, done_to, status, epoch_us(created_at),"
    " epoch_us(finished_at)"
)


@dataclass(frozen=True, slots=True)
class VoidJob:
    """A void by filter: what it asked, and how far it has gone."""

    id: str
    organization_id: str
    status: str  # RUNNING, DONE
    matched: int  # the current events the filter matched when it was asked
    voided: int  # so far
    reason: str
    filter: dict[str, Any]
    created_at_us: int
    finished_at_us: int | None

    @property
    def done(self) -> bool:
        return self.status == DONE


@dataclass(frozen=True, slots=True)
class _Row:
    job: VoidJob
    subject: str
    request_id: str
    actor: str | None
    selection: dict[str, Any]
    through_seq: int
    done_to: int


@dataclass(frozen=True, slots=True)
class Step:
    """What a step did: events voided by it, where the job now is (`done_to` of
    `through_seq`), whether the job is done, and how long its job ran (`seconds`, on the
    writer's thread: what its caller sizes the next by)."""

    voided: int
    done_to: int
    through_seq: int
    done: bool
    seconds: float = 0.0
    stale: bool = False  # not taken: its plan no longer held (`again_if_stale`)


def _row(values: Sequence[Any]) -> _Row:
    (id_, org, subject, request_id, reason, actor, filter_, selection, through) = values[:9]
    matched, voided, done_to, status, created, finished = values[9:]
    job = VoidJob(
        id_, org, status, matched, voided, reason, orjson.loads(filter_), created, finished
    )
    return _Row(job, subject, request_id, actor, orjson.loads(selection), through, done_to)


def _load(con: duckdb.DuckDBPyConnection, job_id: str) -> _Row | None:
    found = first_row(con, f"SELECT {_COLUMNS} FROM void_jobs WHERE id = ?::UUID", [job_id])  # noqa: S608 - fixed text, values bound
    return None if found is None else _row(found)


def get_job(con: duckdb.DuckDBPyConnection, organization_id: str, job_id: str) -> VoidJob | None:
    """The organization's job `job_id`, or None."""
    found = _load(con, job_id)
    return found.job if found is not None and found.job.organization_id == organization_id else None


def running_jobs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The ids of the jobs not done yet, oldest first (to resume after a restart)."""
    rows = con.execute(
        "SELECT id::VARCHAR FROM void_jobs WHERE status = ? ORDER BY created_at, id", [RUNNING]
    ).fetchall()
    return [str(r[0]) for r in rows]


def _selected(selection: dict[str, Any]) -> tuple[str, list[Any]]:
    """The condition on `events` of a job's resolved selection."""
    clauses = [_CUSTOMER]
    params: list[Any] = [selection["customer_ids"], selection["external_ids"]]
    if selection["name"] is not None:
        clauses.append("name = ?")
        params.append(selection["name"])
    if selection["start_us"] is not None:
        clauses.append("timestamp >= make_timestamptz(?)")
        params.append(selection["start_us"])
    if selection["end_us"] is not None:
        clauses.append("timestamp < make_timestamptz(?)")
        params.append(selection["end_us"])
    return " AND ".join(clauses), params


_SCOPE = "organization_id = ?::UUID AND source = 'user'"
# The events of a job's customer references (its selection's ids and external ids).
_CUSTOMER = (
    "(customer_id IN (SELECT unnest(?::UUID[]))"
    " OR external_customer_id IN (SELECT unnest(?::VARCHAR[])))"
)
# The ledger's tables of number meters' usage.
_NUMBERS = ("ledger_usage", "ledger_usage_deltas")
# The relations a voided event's contributions are taken from (count, sum, average meters).
_TAKEN = ("rollups", "rollup_groups")
# Where each kind of meter (`rollups.kind`) keeps its rollups (a number meter's groups too).
_RELATIONS_OF = {
    "number": ("rollups", "rollup_groups"),
    "unique": ("rollup_values",),
    "latest": ("rollup_points",),
    "integral": ("rollup_points",),
}


def matched_seqs(con: duckdb.DuckDBPyConnection, job_id: str) -> pa.Array[Any]:
    """The seqs the job has still to void, in order (where its caller cuts its steps: the
    steps themselves void whatever their window holds then)."""
    found = _load(con, job_id)
    if found is None or found.job.done:
        return pa.array([], pa.int64())
    where, params = _selected(found.selection)
    table = con.sql(
        f"SELECT seq FROM events WHERE {_SCOPE} AND seq > ? AND seq <= ? AND {where}"  # noqa: S608 - fixed text, values bound
        " ORDER BY seq",
        params=[found.job.organization_id, found.done_to, found.through_seq, *params],
    ).to_arrow_table()
    seqs: pa.Array[Any] = table.column("seq").combine_chunks()
    return seqs


@dataclass(frozen=True, slots=True)
class Lift:
    """What `Store.lift` moves into the base tables before a job's steps: the rollups of the
    job's customer references of the meters (`meters`: "id:version") whose rows a step deletes
    (those it cannot take events away from), so that no step writes their files again. Lifted
    once the job is made, the files then hold no row of those meters and references with an
    event the job voids: a step deletes the base tables' rows alone, and events applied since
    keep theirs (steps evaluate them again with the others of their bucket). A meter's lift
    holds while it is the same version and no backfill writes its files (`Window`)."""

    relations: tuple[str, ...]
    where: str
    params: list[object]
    meters: frozenset[str]


def to_lift(con: duckdb.DuckDBPyConnection, job_id: str) -> Lift | None:
    """The job's `Lift` (None: done, or no meter to lift). A meter backfilling is left out:
    its backfill writes files of the customer's rows until it ends."""
    found = _load(con, job_id)
    if found is None or found.job.done:
        return None
    meters = [
        m
        for m in meters_of(con, [found.job.organization_id])
        if str(m.aggregation.func) not in SUBTRACTING and not m.backfilling
    ]
    if not meters:
        return None
    selection = found.selection
    references = [subjects.of_id(i) for i in selection["customer_ids"]]
    references += [subjects.of_external(e) for e in selection["external_ids"]]
    meter_in, meter_params = among("meter_id", [m.id for m in meters], "UUID")
    subject_in, subject_params = among("subject", references)
    return Lift(
        ROLLUP_RELATIONS,
        f"{meter_in} AND {subject_in}",
        [*meter_params, *subject_params],
        frozenset(f"{m.id}:{m.version}" for m in meters),
    )


def counted(
    con: duckdb.DuckDBPyConnection, organization_id: str, request: VoidRequest
) -> dict[str, Any] | None:
    """Step 1's count, made before its record is applied (a read, off the writer; None where
    the filter names no customer): what the record carries for the job to take, if nothing it
    depends on has changed by then (`create_job`), so that the writer counts only the events
    stored since. Of the events stored now."""
    chosen = request.filter
    assert chosen is not None
    try:
        _, selection = _resolved(con, organization_id, chosen)
    except NotFound:
        return None
    through = int(con.execute("SELECT coalesce(max(seq), 0) FROM all_events").fetchall()[0][0])
    return {
        "selection": selection,
        "through_seq": through,
        "voided": _voided(con),
        "matched": _matched(con, organization_id, selection, 0, through),
    }


def _voided(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(*) FROM voided_events").fetchall()[0][0])


def _matched(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    selection: dict[str, Any],
    low: int,
    high: int,
) -> int:
    """The current events `selection` matches of seqs in (`low`, `high`]."""
    where, params = _selected(selection)
    found = con.execute(
        f"SELECT count(*) FROM events WHERE {_SCOPE} AND seq > ? AND seq <= ? AND {where}",  # noqa: S608 - fixed text, values bound
        [organization_id, low, high, *params],
    )
    return int(found.fetchall()[0][0])


def _resolved(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    chosen: VoidFilter,
    ledgers: Ledgers | None = None,
) -> tuple[str, dict[str, Any]]:
    """The customer reference a filter names, and its selection as a job keeps it: the
    customer's references resolved now (404: an id no customer has; on a shard of several, a
    customer another shard holds is refused: `correction_scope.customer_clause`), the rest as
    asked."""
    _, (ids, externals), _ = customer_clause(
        con, organization_id, chosen.customer_id, chosen.external_customer_id, ledgers
    )
    subject = (
        subjects.of_id(str(chosen.customer_id))
        if chosen.customer_id is not None
        else subjects.of_external(chosen.external_customer_id or "")
    )
    start, end = chosen.start_timestamp, chosen.end_timestamp
    return subject, {
        "customer_ids": ids,
        "external_ids": externals,
        "name": chosen.name,
        "start_us": None if start is None else datetime_to_us(start),
        "end_us": None if end is None else datetime_to_us(end),
    }


def create_job(
    organization_id: str,
    request: VoidRequest,
    actor: str | None,
    now_us: int,
    job_id: str,
    counted: dict[str, Any] | None = None,
) -> Job[VoidJob]:
    """Step 1: the job of a void by filter (`request.filter`). `counted`: its count made
    before (`counted`), taken where its selection and the voided events are still those."""
    chosen = request.filter
    assert chosen is not None

    def job(tx: Tx) -> VoidJob:
        con = tx.con
        subject, selection = _resolved(con, organization_id, chosen, tx.live.feature(Ledgers))
        through = tx.live.seq.last
        if (
            counted is not None
            and counted["selection"] == selection
            and counted["through_seq"] <= through
            and counted["voided"] == _voided(con)
        ):
            since = _matched(con, organization_id, selection, counted["through_seq"], through)
            matched = int(counted["matched"]) + since
        else:
            matched = _matched(con, organization_id, selection, 0, through)
        if matched > MAX_FILTERED:
            raise ValidationFailed(
                [
                    FieldError(
                        "value_error",
                        ("body", "filter"),
                        f"Value error, the filter matches {matched} events; a void may match"
                        f" at most {MAX_FILTERED}: narrow it (name, start_timestamp,"
                        " end_timestamp) and send several",
                        request.model_dump(mode="json", exclude_unset=True)["filter"],
                    )
                ],
                business=True,
            )
        status = RUNNING if matched else DONE
        filter_ = chosen.model_dump(mode="json", exclude_unset=True)
        con.execute(
            "INSERT INTO void_jobs VALUES (?::UUID, ?::UUID, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?,"
            " make_timestamptz(?), ?)",
            [
                job_id,
                organization_id,
                subject,
                job_id,
                request.reason,
                actor,
                orjson.dumps(filter_).decode(),
                orjson.dumps(selection).decode(),
                through,
                matched,
                status,
                now_us,
                None if matched else us_to_datetime(now_us),
            ],
        )
        if not matched:
            _finish(tx, organization_id, job_id, actor, request.reason, now_us, 0)
        return VoidJob(
            job_id,
            organization_id,
            status,
            matched,
            0,
            request.reason,
            filter_,
            now_us,
            None if matched else now_us,
        )

    return job


def step_job(
    job_id: str,
    up_to_seq: int,
    at_us: int,
    lifted: frozenset[str] = frozenset(),
    planned: Plan | None = None,
    *,
    again_if_stale: bool = False,
) -> Job[Step]:
    """Step 2 (and 3): void the job's matched events of seqs after `done_to`, up to
    `up_to_seq` (at most the job's `through_seq`), at time `at_us`. `lifted`: the meters
    ("id:version") whose rollups of the job's customer this store has lifted (`to_lift`).
    `planned`: the step's reads made before (`plan`), taken if nothing they depend on has
    changed since; else read again here (the same step either way), or, `again_if_stale`, not
    taken at all (`Step.stale`: its caller plans again, off the writer; only where no other
    core applies the same step, which must then do what this one does)."""

    def job(tx: Tx) -> Step:
        started = time.perf_counter()
        con = tx.con
        found = _load(con, job_id)
        if found is None or found.job.done:
            done_to = 0 if found is None else found.done_to
            through = 0 if found is None else found.through_seq
            return Step(0, done_to, through, True)
        high = _high(found, up_to_seq)
        plan = planned
        if plan is None or not plan.holds(con, found, high, lifted, at_us):
            if plan is not None and plan.file is not None:
                tx.live.segments.abandon(Change([plan.file]))  # never listed
            if again_if_stale:
                return Step(0, found.done_to, found.through_seq, False, stale=True)
            plan = _plan(con, found, high, lifted, at_us, tx.live.bound)
        voided = _apply(tx, found, plan)
        done = high >= found.through_seq
        con.execute(
            "UPDATE void_jobs SET done_to = ?, voided = voided + ?, status = ?,"
            " finished_at = ? WHERE id = ?::UUID",
            [
                high,
                voided,
                DONE if done else RUNNING,
                us_to_datetime(at_us) if done else None,
                job_id,
            ],
        )
        if done:
            total = found.job.voided + voided
            job_ = found.job
            _finish(tx, job_.organization_id, job_id, found.actor, job_.reason, at_us, total)
        return Step(voided, high, found.through_seq, done, time.perf_counter() - started)

    return job


def _high(found: _Row, up_to_seq: int) -> int:
    """Where a step asked to void up to `up_to_seq` ends: after where the job is, at most at
    its end."""
    return min(max(up_to_seq, found.done_to), found.through_seq)


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """What a step reads before it writes (`plan`), made off the writer: the events its
    window voids (`chunk`: seq, subject, bucket) and their contributions (`gone`), the rows
    taking them from the count, sum and average meters' rollups (`taken`, per relation), and
    the lifted meters' rollups of the (customer reference, bucket) keys they touch evaluated
    again without them (`again`, per relation). It holds while nothing it read has changed
    (`signature`): events were voided or replaced since, meters changed, a reset came, a
    customer went. Events applied since are no matter: their rollups are rows of their own,
    their seqs after the job's."""

    low: int
    high: int
    at_us: int
    lifted: frozenset[str]
    signature: tuple[Any, ...]
    meters: list[MeterRow]
    chunk: pa.Table
    gone: list[Evaluated]
    taken: dict[str, pa.Table]
    again: dict[str, pa.Table]
    markers: pa.Table  # the voided events' markers, as `voided_events` keeps them, by seq
    file: Segment | None = None  # `markers` written as a file of `voided_events`, unlisted

    def with_file(self, file: Segment) -> Plan:
        """The plan with its markers written already (`Store.write_segment`): the step lists
        the file instead of inserting them, or deletes it if the plan no longer holds."""
        return replace(self, file=file)

    def holds(
        self,
        con: duckdb.DuckDBPyConnection,
        found: _Row,
        high: int,
        lifted: frozenset[str],
        at_us: int,
    ) -> bool:
        return (self.low, self.high, self.lifted, self.at_us) == (
            found.done_to,
            high,
            lifted,
            at_us,
        ) and _signature(con, found) == self.signature


def plan(
    con: duckdb.DuckDBPyConnection,
    job_id: str,
    up_to_seq: int,
    at_us: int,
    bound: groups.Bound,
    lifted: frozenset[str] = frozenset(),
) -> Plan | None:
    """The `Plan` of the job's next step (as `step_job` takes it), read on `con` (a reader's:
    off the writer); None if the job is done. `bound`: the store's bound on a
    dimension's values (`rollups.partials`)."""
    found = _load(con, job_id)
    if found is None or found.job.done:
        return None
    return _plan(con, found, _high(found, up_to_seq), lifted, at_us, bound)


def _signature(con: duckdb.DuckDBPyConnection, found: _Row) -> tuple[Any, ...]:
    """What a plan depends on besides the events applied since (see `Plan`), in one statement
    (the writer checks it before each step): the organization's voided events (another's
    change nothing a plan read; less the job's own, so that a plan read before its previous
    step committed would still hold), its meters (versions, backfills, failures), the resets
    of the job's customer references, and the customers they name."""
    selection = found.selection
    org = found.job.organization_id
    row = con.execute(
        "SELECT (SELECT count(*) FROM voided_events WHERE organization_id = $org),"  # noqa: S608 - fixed text, values bound
        " (SELECT list((id::VARCHAR, version, backfilled_to, archived_at) ORDER BY id)"
        " FROM meters WHERE organization_id = $org),"
        " (SELECT list((meter_id::VARCHAR, version) ORDER BY meter_id, version) FROM meter_failures"
        " WHERE meter_id IN (SELECT id FROM meters WHERE organization_id = $org)),"
        " (SELECT list((r.meter_id::VARCHAR, r.subject, r.reset_seq)"
        " ORDER BY r.meter_id, r.subject, r.reset_seq)"
        f" FROM ({rollups.RESETS}) r WHERE r.subject IN (SELECT unnest($subjects::VARCHAR[]))),"
        " (SELECT list(id::VARCHAR ORDER BY id) FROM customers WHERE organization_id = $org"
        " AND (id IN (SELECT unnest($ids::UUID[]))"
        " OR external_id IN (SELECT unnest($externals::VARCHAR[]))))",
        {
            "org": org,
            "ids": selection["customer_ids"],
            "externals": selection["external_ids"],
            "subjects": _references(selection),
        },
    ).fetchall()[0]
    voided, meters, failed, resets, customers = row
    return (voided - found.job.voided, meters, failed, tuple(resets or ()), customers)


def _resets(signature: tuple[Any, ...]) -> tuple[tuple[str, str, int], ...]:
    """(meter, subject, reset seq) of the resets a `_signature` holds."""
    resets: tuple[tuple[str, str, int], ...] = signature[3]
    return resets


def _references(selection: dict[str, Any]) -> list[str]:
    """The customer references (subjects) of a job's events."""
    found = [subjects.of_id(i) for i in selection["customer_ids"]]
    return found + [subjects.of_external(e) for e in selection["external_ids"]]


def _plan(
    con: duckdb.DuckDBPyConnection,
    found: _Row,
    high: int,
    lifted: frozenset[str],
    at_us: int,
    bound: groups.Bound,
) -> Plan:
    """Steps 1, 2 and 5's reads of the window (done_to, `high`]."""
    org = found.job.organization_id
    low = found.done_to
    signature = _signature(con, found)
    meters = meters_of(con, [org])
    where, params = _selected(found.selection)
    window = f"seq > ? AND seq <= ? AND {where}"
    window_params = [low, high, *params]
    # The window's events after every reset of the job's customer (its resets are in the
    # signature): the ledger's usage as live ingest takes it.
    after = all(int(reset_seq) < low for _, _, reset_seq in _resets(signature))
    gone = (
        evaluated_events(con, meters, org, window, window_params, at_us, after_resets=after)
        if high > low
        else []
    )
    if gone and any(not m.backfilling for m in meters):
        chunk = gone[0].keys.select(["seq", "subject", "bucket"])  # every event of the window
    else:
        chunk = con.sql(
            f"SELECT seq, {OF_EVENT} AS subject, {BUCKET} AS bucket FROM events"  # noqa: S608 - fixed text, values bound
            f" WHERE {_SCOPE} AND {window}",
            params=[org, *window_params],
        ).to_arrow_table()
    subtracting = [m.id for m in meters if str(m.aggregation.func) in SUBTRACTING]
    taken: dict[str, pa.Table] = {}
    if subtracting and chunk.num_rows:
        all_partials = rollups.partials(con, gone, bound)
        for relation in _TAKEN:
            rows = all_partials[relation]
            if rows.num_rows:
                mine = pc.is_in(rows.column("meter_id"), pa.array(subtracting, pa.string()))
                taken[relation] = rows.filter(mine)
    fast = [
        m
        for m in meters
        if str(m.aggregation.func) not in SUBTRACTING
        and not m.backfilling
        and f"{m.id}:{m.version}" in lifted
    ]
    again: dict[str, pa.Table] = {}
    if fast and chunk.num_rows:
        again = _evaluated_again(con, org, fast, found.selection, chunk, at_us, bound)
    n = chunk.num_rows
    # Repeated in C: a list of n Python objects holds the GIL, and with it the event loop
    # (160 ms a column for 500,000 markers).
    markers = pa.table(
        {
            "seq": pc.take(chunk.column("seq"), pc.sort_indices(chunk.column("seq"))),
            "organization_id": pa.repeat(pa.scalar(org, pa.string()), n),
            "request_id": pa.repeat(pa.scalar(found.request_id, pa.string()), n),
            "reason": pa.repeat(pa.scalar(found.job.reason, pa.string()), n),
            "voided_at": pa.repeat(
                pa.scalar(found.job.created_at_us, pa.timestamp("us", tz="UTC")), n
            ),
        }
    )
    return Plan(
        low,
        high,
        at_us,
        lifted,
        signature,
        meters,
        chunk,
        gone,
        taken,
        again,
        markers,
    )


def _evaluated_again(
    con: duckdb.DuckDBPyConnection,
    org: str,
    meters: Sequence[MeterRow],
    selection: dict[str, Any],
    chunk: pa.Table,
    at_us: int,
    bound: groups.Bound,
) -> dict[str, pa.Table]:
    """The rollups of `meters` of each (customer reference, bucket) of `chunk`, evaluated
    from the current events but those of `chunk`: read by time, the events' files being
    sorted by it, and by the job's customer, whose references the keys are."""
    keys = chunk.select(["subject", "bucket"]).group_by(["subject", "bucket"]).aggregate([])
    low = pc.min(keys.column("bucket")).as_py()
    high = pc.max(keys.column("bucket")).as_py()
    with registered(con, "_keys", keys), registered(con, "_chunk", chunk.select(["seq"])):
        where = (
            f"timestamp >= ? AND timestamp < ? + INTERVAL {rollups.BUCKET_MINUTES} MINUTE"  # noqa: S608 - fixed text
            f" AND {_CUSTOMER}"
            f" AND ({OF_EVENT}, {BUCKET}) IN (SELECT subject, bucket FROM _keys)"
            " AND seq NOT IN (SELECT seq FROM _chunk)"
        )
        params = [low, high, selection["customer_ids"], selection["external_ids"]]
        again = evaluated_events(con, meters, org, where, params, at_us, ledger=False)
        found = rollups.partials(con, again, bound)
        return {r: rows for r, rows in found.items() if rows.num_rows}


def _finish(
    tx: Tx,
    organization_id: str,
    job_id: str,
    actor: str | None,
    reason: str,
    at_us: int,
    voided: int,
) -> None:
    """Step 3: the job's system event and webhook event (the first ids it voided)."""
    con = tx.con
    seqs = [
        int(r[0])
        for r in con.execute(
            "SELECT seq FROM voided_events WHERE request_id = ? ORDER BY seq LIMIT 100", [job_id]
        ).fetchall()
    ]
    # Bounded by seq as well: the events' files are pruned by it.
    rows = con.execute(
        "SELECT id::VARCHAR, external_id FROM all_events WHERE seq >= ? AND seq <= ?"
        " AND seq IN (SELECT unnest(?::BIGINT[])) ORDER BY seq",
        [min(seqs, default=0), max(seqs, default=0), seqs],
    ).fetchall()
    done = Corrected([str(r[0]) for r in rows], [r[1] for r in rows], 0, 0)
    extra = {"job_id": job_id}
    record(tx, organization_id, VOIDED, job_id, at_us, actor, reason, done, extra, voided=voided)


def _apply(tx: Tx, found: _Row, plan: Plan) -> int:
    """Steps 3 to 6 of a step's `plan`: how many events it voided."""
    con = tx.con
    chunk = plan.chunk
    if not chunk.num_rows:
        return 0
    org = found.job.organization_id
    segments = tx.live.segments
    # Step 3: the markers' file, written before (gone if this job ran before and rolled back:
    # a rollback deletes the files it would have listed).
    if plan.file is not None and segments.path(plan.file).exists():
        tx.live.change_segments(con, Change([plan.file]))
    else:
        with registered(con, "_voided", plan.markers):
            con.execute("INSERT INTO voided_events_base SELECT * FROM _voided")
    tx.live.void(con, numpy(plan.markers.column("seq"), np.int64))
    window = Window(tx, org, plan, found.selection)
    window.rollups()  # step 5, rollups first: the ledger's reads below use them
    window.ledger()
    # Step 6; the alerts it fires named by where the step ends (a voided event's seq: no other
    # change takes it to name its own).
    settle(tx, org, plan.meters, window.references, plan.at_us, plan.high)
    return int(chunk.num_rows)


class Window:
    """Step 5 for a step's window, each figure taken where its cost follows the voided events:

    - Rollups of count, sum and average meters: rows taking the voided events' contributions
      away, in the rollups' base table (no file is written again).
    - Rollups of the others (minimum, maximum, unique, latest, integral), which nothing can
      take away from: the rows of each (customer reference, bucket) the window touched are
      deleted and evaluated again from the current events of their buckets (read by time, as
      the events' files are sorted by it). Where the job's customer's rows of a meter were
      lifted into the base tables before its steps (`Store.lift`: `lifted`, "meter id:version"),
      they are deleted there; else the files holding them are written again.
    - The ledger: every number meter's events and totals (and an average's) less the voided
      events'. A minimum's or maximum's extreme is read again only when a voided event held it,
      and a unique meter's values only those a voided event had, from the rollups just made
      current (the ledger since a reset that never came is every current event); where a reset
      came (the ledger holds part of the events), for a latest meter, or a meter backfilling,
      the customer reference's ledger is evaluated again from its events, as `correct` does.
    """

    def __init__(self, tx: Tx, org: str, plan: Plan, selection: dict[str, Any]) -> None:
        self.tx, self.con = tx, tx.con
        self.org = org
        self.plan = plan
        self.selection = selection
        self.meters = plan.meters
        chunk = plan.chunk
        self.keys = (
            chunk.select(["subject", "bucket"]).group_by(["subject", "bucket"]).aggregate([])
        )
        self.references = sorted(str(s) for s in pc.unique(self.keys.column("subject")).to_pylist())
        self.at_us = plan.at_us
        self.others = [m for m in plan.meters if str(m.aggregation.func) not in SUBTRACTING]

    # ---- rollups --------------------------------------------------------------------------

    def rollups(self) -> None:
        con = self.con
        for relation, rows in self.plan.taken.items():
            keys = ", ".join(RELATIONS[relation].order.split(", ")[1:])
            with registered(con, "_gone", rows):
                con.execute(
                    f"INSERT INTO {relation} SELECT meter_id::UUID, {keys}, -events, -total,"  # noqa: S608 - fixed text
                    " 'Infinity'::DOUBLE, '-Infinity'::DOUBLE FROM _gone"
                )
            if relation == "rollup_groups":
                groups.list_folded(con, rows)
        if self.others:
            self._others_again()

    def _others_again(self) -> None:
        con, live, plan = self.con, self.tx.live, self.plan
        fast = [m for m in self.others if self._is_lifted(m)]
        slow = [m for m in self.others if not self._is_lifted(m)]
        again = dict(plan.again)
        if slow:  # read here: their rows of the keys in files are deleted below, every one
            found = _evaluated_again(
                con,
                self.org,
                slow,
                self.selection,
                plan.chunk,
                self.at_us,
                self.tx.live.bound,
            )
            for relation, rows in found.items():
                again[relation] = (
                    pa.concat_tables([again[relation], rows]) if relation in again else rows
                )
        low = pc.min(self.keys.column("bucket")).as_py()
        high = pc.max(self.keys.column("bucket")).as_py()
        with registered(con, "_keys", self.keys):
            mine = "(subject, bucket) IN (SELECT subject, bucket FROM _keys)"
            for relation in ROLLUP_RELATIONS:
                base = RELATIONS[relation].base
                kept_here = [m for m in fast if relation in _RELATIONS_OF[kind(m)]]
                if kept_here:
                    meter_in, meter_params = among("meter_id", [m.id for m in kept_here], "UUID")
                    con.execute(
                        f"DELETE FROM {base} WHERE {meter_in} AND {mine}",  # noqa: S608 - fixed text, values bound
                        meter_params,
                    )
                if slow:
                    meter_in, meter_params = among("meter_id", [m.id for m in slow], "UUID")
                    subject_in, subject_params = among("subject", self.references)
                    live.delete_rows(
                        con,
                        relation,
                        f"{meter_in} AND {subject_in} AND bucket >= ? AND bucket <= ? AND {mine}",
                        [*meter_params, *subject_params, low, high],
                    )
        for relation, rows in again.items():
            with registered(con, "_again", rows):
                base = RELATIONS[relation].base
                con.execute(f"INSERT INTO {base} SELECT * FROM _again")  # noqa: S608 - fixed text
            if relation == "rollup_groups":
                groups.list_folded(con, rows)

    def _is_lifted(self, meter: MeterRow) -> bool:
        return not meter.backfilling and f"{meter.id}:{meter.version}" in self.plan.lifted

    # ---- the ledger -----------------------------------------------------------------------

    def ledger(self) -> None:
        con, gone = self.con, self.plan.gone
        reset = self._reset()
        again: set[tuple[str, str]] = set()  # (meter, subject) evaluated again
        extremes = {m.id: str(m.aggregation.func) for m in self.others if kind(m) == "number"}
        uniques = {m.id for m in self.others if kind(m) == "unique"}
        extremes_or_values = {*extremes, *uniques}
        for meter in self.meters:
            for subject in self.references:
                whole = meter.backfilling or kind(meter) == "latest"
                if whole or ((meter.id, subject) in reset and meter.id in extremes_or_values):
                    again.add((meter.id, subject))
        usage = pa.concat_tables([e.ledger for e in gone]) if gone else None
        if usage is not None and usage.num_rows:
            before = self._usage(usage) if extremes else {}
            rollups.store_ledger(con, [negated(e) for e in gone])
            held_by_voided: dict[tuple[str, str], tuple[str, float]] = {}
            for meter_id, subject, events, _, low, high in zip(
                *usage.to_pydict().values(), strict=True
            ):
                func = extremes.get(meter_id)
                if func is None or (meter_id, subject) in again:
                    continue
                # None before (a deleted customer's): nothing to keep.
                held, held_low, held_high = before.get((meter_id, subject), (0, 0.0, 0.0))
                if events >= held:
                    self._clear(meter_id, subject, _NUMBERS)  # nothing left: no extreme either
                elif func == "min" and low <= held_low:
                    held_by_voided[(meter_id, subject)] = (func, held_low)
                elif func == "max" and high >= held_high:
                    held_by_voided[(meter_id, subject)] = (func, held_high)
            if held_by_voided:
                self._extremes_again(held_by_voided)
        values = pa.concat_tables([e.ledger_values for e in gone]) if gone else None
        if values is not None and values.num_rows:
            self._values_again(values, again)
        for meter_id, subject in sorted(again):
            self._clear(meter_id, subject)
            self._evaluated_again(meter_id, subject)

    def _reset(self) -> set[tuple[str, str]]:
        """(meter, subject) of the job's customer references whose customer meter was reset
        (the plan's, which holds)."""
        return {(str(m), str(s)) for m, s, _ in _resets(self.plan.signature)}

    def _usage(self, usage: pa.Table) -> dict[tuple[str, str], tuple[int, float, float]]:
        """The ledger's (events, low, high) of each (meter, subject) of `usage`, before."""
        pairs = usage.select(["meter_id", "subject"])
        with registered(self.con, "_pairs", pairs):
            rows = self.con.execute(
                "SELECT meter_id::VARCHAR, subject, sum(events), min(low), max(high)"
                " FROM all_ledger_usage WHERE (meter_id::VARCHAR, subject) IN"
                " (SELECT meter_id, subject FROM _pairs) GROUP BY ALL"
            ).fetchall()
        return {(str(m), str(s)): (int(n), float(lo), float(hi)) for m, s, n, lo, hi in rows}

    def _clear(self, meter_id: str, subject: str, tables: Sequence[str] = LEDGER_TABLES) -> None:
        for table in tables:  # Table names from fixed lists only.
            self.con.execute(
                f"DELETE FROM {table} WHERE meter_id = ?::UUID AND subject = ?",  # noqa: S608 - fixed text, values bound
                [meter_id, subject],
            )

    def _extremes_again(self, held: dict[tuple[str, str], tuple[str, float]]) -> None:
        """The ledger's extremes (meter, subject) of `held` that a voided event held (its
        function, and the extreme before), read again from the rollups (every current event of
        the subject: no reset came); where one changed, its rows become one row of all they
        had, with the new extremes."""
        con = self.con
        meter_in, meter_params = among("meter_id", sorted({m for m, _ in held}), "UUID")
        subject_in, subject_params = among("subject", sorted({s for _, s in held}))
        rows = con.execute(
            "SELECT meter_id::VARCHAR, subject, min(low), max(high) FROM all_rollups"  # noqa: S608 - fixed text, values bound
            f" WHERE {meter_in} AND {subject_in} GROUP BY ALL",
            [*meter_params, *subject_params],
        ).fetchall()
        now = {(str(m), str(s)): (low, high) for m, s, low, high in rows}
        for (meter_id, subject), (func, was) in held.items():
            low, high = now.get((meter_id, subject), (None, None))
            if (low if func == "min" else high) == was:
                continue  # another current event holds it too
            row = con.execute(
                "SELECT sum(events), sum(total), min(created_at), max(modified_at)"
                " FROM all_ledger_usage WHERE meter_id = ?::UUID AND subject = ?",
                [meter_id, subject],
            ).fetchall()[0]
            self._clear(meter_id, subject, _NUMBERS)
            con.execute(
                "INSERT INTO ledger_usage_deltas VALUES (?::UUID, ?, ?, ?, ?, ?, ?, ?)",
                [meter_id, subject, row[0], row[1], low, high, row[2], row[3]],
            )

    def _values_again(self, values: pa.Table, again: set[tuple[str, str]]) -> None:
        """A unique meter's values the voided events had that no current event of the subject
        has any more (its rollups say), out of the ledger."""
        con = self.con
        asked = {
            (str(m), str(s), str(v)) for m, s, v in zip(*values.to_pydict().values(), strict=True)
        }
        meter_in, meter_params = among("meter_id", sorted({m for m, _, _ in asked}), "UUID")
        subject_in, subject_params = among("subject", sorted({s for _, s, _ in asked}))
        with registered(con, "_values", values):
            held = con.execute(
                "SELECT DISTINCT meter_id::VARCHAR, subject, value FROM all_rollup_values"  # noqa: S608 - fixed text, values bound
                f" WHERE {meter_in} AND {subject_in} AND (meter_id::VARCHAR, subject, value)"
                " IN (SELECT meter_id, subject, value FROM _values)",
                [*meter_params, *subject_params],
            ).fetchall()
        kept = {(str(m), str(s), str(v)) for m, s, v in held}
        for meter_id, subject, value in sorted(asked - kept):
            if (str(meter_id), str(subject)) in again:
                continue
            for table in ("ledger_usage_values", "ledger_usage_value_deltas"):
                con.execute(
                    f"DELETE FROM {table} WHERE meter_id = ?::UUID AND subject = ?"  # noqa: S608 - fixed text, values bound
                    " AND value = ?",
                    [meter_id, subject, value],
                )

    def _evaluated_again(self, meter_id: str, subject: str) -> None:
        meter = next(m for m in self.meters if m.id == meter_id)
        where = f"{OF_EVENT} = ?"
        found = evaluated_events(self.con, [meter], self.org, where, [subject], self.at_us)
        rollups.store_ledger(self.con, found)
