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
2. Each step (`void_steps.step_job`, a writer job) voids the matched events of the next window
   of seqs, from where the last step ended (`done_to`) up to a seq its caller chose, at most
   `through_seq`: what `corrections.correct` does to a selection, in one transaction, so that a
   voided event stops counting everywhere at its step and every read between steps is
   consistent (`void_steps.Window` says how, at a cost that follows the events voided). Its
   markers name the job's request id and reason, with the job's time, whatever the steps'
   sizes, so that the voided events are the same whichever steps voided them. What a step
   reads is read first, off the writer (`void_plans.plan`: with its markers written as a file
   of `voided_events`), and taken by the writer if nothing it depends on has changed since
   (`Plan.holds`); else read there (the same step either way, on every core).
3. The step that reaches `through_seq` ends the job (`done`), and stores its system event and
   webhook event (`event.voided`, `finish`), as a void of one record does.

This module keeps the jobs' records (steps 1 and 3); `void_plans` and `void_steps` step 2.

Before a job's first step its customer's rollups of the meters a step cannot take events from
(minimum, maximum, unique, points) are lifted out of the rollups' files into their base tables
(`to_lift`, `Store.lift`), where each step deletes and writes again those of its window's
buckets; a meter not lifted has its files written again by each step. Steps are the caller's
to take (`aggregator.background.voids`: in Kafka mode each is a journal group, so that every
core applies it at the same place).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from aggregator.errors import NotFound
from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import meters_of
from aggregator.store.base.rows import among, first_row
from aggregator.store.engine.segments import ROLLUP_RELATIONS
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.tables.correction_jobs import record
from aggregator.store.tables.correction_scope import customer_clause
from aggregator.store.tables.corrections import Corrected
from aggregator.store.tables.ledger_tables import Ledgers
from aggregator.store.tables.retraction import SUBTRACTING
from meters.corrections import MAX_FILTERED, VOIDED, VoidFilter, VoidRequest
from meters.errors import FieldError, ValidationFailed
from meters.times import datetime_to_us, us_to_datetime

__all__ = [
    "CUSTOMER",
    "DONE",
    "RUNNING",
    "SCOPE",
    "JobRow",
    "Lift",
    "VoidJob",
    "counted",
    "create_job",
    "finish",
    "get_job",
    "load",
    "matched_seqs",
    "running_jobs",
    "selected",
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
class JobRow:
    job: VoidJob
    subject: str
    request_id: str
    actor: str | None
    selection: dict[str, Any]
    through_seq: int
    done_to: int


def _row(values: Sequence[Any]) -> JobRow:
    (id_, org, subject, request_id, reason, actor, filter_, selection, through) = values[:9]
    matched, voided, done_to, status, created, finished = values[9:]
    job = VoidJob(
        id_, org, status, matched, voided, reason, orjson.loads(filter_), created, finished
    )
    return JobRow(job, subject, request_id, actor, orjson.loads(selection), through, done_to)


def load(con: duckdb.DuckDBPyConnection, job_id: str) -> JobRow | None:
    found = first_row(con, f"SELECT {_COLUMNS} FROM void_jobs WHERE id = ?::UUID", [job_id])  # noqa: S608 - fixed text, values bound
    return None if found is None else _row(found)


def get_job(con: duckdb.DuckDBPyConnection, organization_id: str, job_id: str) -> VoidJob | None:
    """The organization's job `job_id`, or None."""
    found = load(con, job_id)
    return found.job if found is not None and found.job.organization_id == organization_id else None


def running_jobs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The ids of the jobs not done yet, oldest first (to resume after a restart)."""
    rows = con.execute(
        "SELECT id::VARCHAR FROM void_jobs WHERE status = ? ORDER BY created_at, id", [RUNNING]
    ).fetchall()
    return [str(r[0]) for r in rows]


def selected(selection: dict[str, Any]) -> tuple[str, list[Any]]:
    """The condition on `events` of a job's resolved selection."""
    clauses = [CUSTOMER]
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


SCOPE = "organization_id = ?::UUID AND source = 'user'"
# The events of a job's customer references (its selection's ids and external ids).
CUSTOMER = (
    "(customer_id IN (SELECT unnest(?::UUID[]))"
    " OR external_customer_id IN (SELECT unnest(?::VARCHAR[])))"
)


def matched_seqs(con: duckdb.DuckDBPyConnection, job_id: str) -> pa.Array[Any]:
    """The seqs the job has still to void, in order (where its caller cuts its steps: the
    steps themselves void whatever their window holds then)."""
    found = load(con, job_id)
    if found is None or found.job.done:
        return pa.array([], pa.int64())
    where, params = selected(found.selection)
    table = con.sql(
        f"SELECT seq FROM events WHERE {SCOPE} AND seq > ? AND seq <= ? AND {where}"  # noqa: S608 - fixed text, values bound
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
    found = load(con, job_id)
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
    where, params = selected(selection)
    found = con.execute(
        f"SELECT count(*) FROM events WHERE {SCOPE} AND seq > ? AND seq <= ? AND {where}",  # noqa: S608 - fixed text, values bound
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
            finish(tx, organization_id, job_id, actor, request.reason, now_us, 0)
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


def finish(
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
