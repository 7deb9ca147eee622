"""A void job's steps (`void_jobs`, steps 2 and 3): each voids the matched events of its window
in one writer job (`step_job`), from its plan (`void_plans`); `Window` takes the voided events
out of every figure derived from them, at a cost that follows the events voided."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.arrays import numpy
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import among, registered
from aggregator.store.base.subjects import OF_EVENT
from aggregator.store.engine.compaction import LEDGER_TABLES
from aggregator.store.engine.segments import RELATIONS, ROLLUP_RELATIONS, Change
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering import groups, rollups
from aggregator.store.metering.rollups import kind
from aggregator.store.tables.corrections import (
    SUBTRACTING,
    evaluated_events,
    negated,
    settle,
)
from aggregator.store.tables.void_jobs import DONE, RUNNING, JobRow, finish, load
from aggregator.store.tables.void_plans import Plan, evaluated_again, read_plan, resets, step_end
from meters.times import us_to_datetime

__all__ = ["Step", "Window", "step_job"]

# The ledger's tables of number meters' usage.
_NUMBERS = ("ledger_usage", "ledger_usage_deltas")

# Where each kind of meter (`rollups.kind`) keeps its rollups (a number meter's groups too).
_RELATIONS_OF = {
    "number": ("rollups", "rollup_groups"),
    "unique": ("rollup_values",),
    "latest": ("rollup_points",),
    "integral": ("rollup_points",),
}


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
        found = load(con, job_id)
        if found is None or found.job.done:
            done_to = 0 if found is None else found.done_to
            through = 0 if found is None else found.through_seq
            return Step(0, done_to, through, True)
        high = step_end(found, up_to_seq)
        plan = planned
        if plan is None or not plan.holds(con, found, high, lifted, at_us):
            if plan is not None and plan.file is not None:
                tx.live.segments.abandon(Change([plan.file]))  # never listed
            if again_if_stale:
                return Step(0, found.done_to, found.through_seq, False, stale=True)
            plan = read_plan(con, found, high, lifted, at_us, tx.live.bound)
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
            finish(tx, job_.organization_id, job_id, found.actor, job_.reason, at_us, total)
        return Step(voided, high, found.through_seq, done, time.perf_counter() - started)

    return job


def _apply(tx: Tx, found: JobRow, plan: Plan) -> int:
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
            found = evaluated_again(
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
        return {(str(m), str(s)) for m, s, _ in resets(self.plan.signature)}

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
