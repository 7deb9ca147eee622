"""A void job's steps (`void_jobs`, steps 2 and 3): each voids the matched events of its window
in one writer job (`step_job`), from its plan (`void_plans`), and takes them out of every
figure derived from them as a correction does (`retraction`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from aggregator.store.base.arrays import numpy
from aggregator.store.engine.segments import Change
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.tables.corrections import settle
from aggregator.store.tables.retraction import retract
from aggregator.store.tables.void_jobs import DONE, RUNNING, JobRow, finish, load
from aggregator.store.tables.void_plans import Plan, read_plan, step_end
from meters.times import us_to_datetime

__all__ = ["Step", "step_job"]


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
    chunk = plan.retraction.chunk
    if not chunk.num_rows:
        return 0
    org = found.job.organization_id
    segments = tx.live.segments
    # Step 3: the markers' file, written before (gone if this job ran before and rolled back:
    # a rollback deletes the files it would have listed).
    if plan.file is not None and segments.path(plan.file).exists():
        tx.live.change_segments(con, Change([plan.file]))
    else:
        tx.live.store_rows(con, "voided_events", plan.markers)
    tx.live.void(con, numpy(plan.markers.column("seq"), np.int64))
    references = retract(tx, org, plan.retraction)  # step 5
    # Step 6; the alerts it fires named by where the step ends (a voided event's seq: no other
    # change takes it to name its own).
    settle(tx, org, plan.retraction.meters, references, plan.at_us, plan.high)
    return int(chunk.num_rows)
