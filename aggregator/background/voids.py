"""Void jobs: voids by filter (`store.void_jobs`) stepped through in the background.

A job's events are voided by steps, each one writer job over the matched events of the next
window of seqs (`void_steps.step_job`), so that other tenants' writes go on between them rather
than waiting for a million events. A window is cut to hold about `chunk` of the events the job
matched (read once, `matched_seqs`), and `chunk` follows what a step costs the writer, as the
backfill's does: a step holds it about half its job bound. A step's reads (its events and
their contributions, the rollups it makes again: `void_plans.plan`) are made first, at the
lowest CPU priority (`Store.read_behind`), so that the writer only checks they still hold and
writes, and ingest's threads get the CPU first. One step runs at
a time whatever the number of jobs (they take turns). Unfinished jobs resume when the process
starts again, from where their last step ended.

Jobs take turns and failed steps are retried as `loop.Steps` says. In Kafka mode each step is
a group of the journal (an entry naming the job and the seq its step voids up to: `loop`).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from aggregator.background.loop import Steps
from aggregator.intake.journal import VOIDS, Entry, Journal, Records
from aggregator.intake.leadership import Role
from aggregator.store import (
    Job,
    Outcome,
    Positions,
    Store,
    VoidJob,
    void_jobs,
    void_plans,
    void_steps,
)
from ingest.tasks import next_chunk
from meters.commands import Command
from meters.times import now_us

log = logging.getLogger(__name__)

# A step voids up to here at most: the job's `through_seq` then bounds it.
_THROUGH = 2**62
_NONE: frozenset[str] = frozenset()
# Plans of one step made again off the writer before the writer makes it (embedded).
_STALE_PLANS = 3


class Voider(Steps):
    """Runs one task per void job. An async context manager: exit cancels the tasks (their
    progress is committed step by step, so they resume on the next start)."""

    kind = VOIDS
    what = "voider"

    def __init__(
        self,
        store: Store,
        *,
        # The first step's events: few, so that a job's progress shows within a second and
        # its first step holds the writer no longer than its later ones (they follow its cost).
        chunk_events: int = 10_000,
        min_chunk_events: int = 10_000,
        max_chunk_events: int = 500_000,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 60.0,
        journal: Journal | None = None,
        role: Role | None = None,
    ) -> None:
        super().__init__(
            store,
            journal,
            role,
            retry_seconds=retry_seconds,
            max_retry_seconds=max_retry_seconds,
        )
        self._chunk = chunk_events
        self._min_chunk = min_chunk_events
        self._max_chunk = max_chunk_events
        self._lifted: dict[str, frozenset[str]] = {}  # per job, its meters lifted here

    async def _resume(self) -> None:
        for job_id in await self._store.read_now(void_jobs.running_jobs):
            self.start(job_id)

    def on_applied(self, command: Command, outcome: Outcome) -> None:
        ok, value = outcome
        if ok and command.kind == "event.void" and isinstance(value, VoidJob) and not value.done:
            self.start(value.id)

    def start(self, job_id: str) -> None:
        """Step through the job `job_id` (once: a job already running is left to its task)."""
        self._tasks.start(job_id, lambda: self._run(job_id), f"void {job_id}")

    async def _step(self, job_id: str, up_to: int) -> void_steps.Step | None:
        if self._journal is None:
            # A plan gone stale (events voided or meters changed meanwhile) is made again
            # here, off the writer, a few times before the writer makes it.
            for _ in range(_STALE_PLANS):
                step = await self._planned(job_id, up_to, now_us(), again_if_stale=True)
                done = await self._store.write(step)
                if not done.stale:
                    return done
            return await self._store.write(await self._planned(job_id, up_to, now_us()))

        async def due() -> bool:  # a job the journal's steps finished: not
            return job_id in await self._store.read_now(void_jobs.running_jobs)

        if not await self.leading(due):
            return None
        entry = Entry(VOIDS, (), now_us(), void=(job_id, up_to))
        step = await self._planned(job_id, up_to, entry.at_us)
        return await self._journal.append_job(entry, step)

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        assert entry.void is not None
        job_id, up_to = entry.void
        step = await self._planned(job_id, up_to, entry.at_us)
        await self._store.queued_at(step, positions)

    async def _planned(
        self, job_id: str, up_to: int, at_us: int, *, again_if_stale: bool = False
    ) -> Job[void_steps.Step]:
        """The step's job, its reads made first in the background (`void_plans.plan`), so that
        the writer only checks they still hold and writes: other tenants' writes wait for that
        much alone."""
        lifted = self._lifted.get(job_id, _NONE)
        await self._store.stored()
        planned = await self._store.read_behind(
            void_plans.plan, job_id, up_to, at_us, self._store.bound, lifted
        )
        if planned is not None and planned.markers.num_rows:
            # The markers too, as a file the step lists.
            file = await self._store.write_segment("voided_events", planned.markers)
            planned = planned.with_file(file)
        # Stored by the flusher, what was applied meanwhile is not the step's to store.
        await self._store.stored()
        return void_steps.step_job(
            job_id, up_to, at_us, lifted, planned, again_if_stale=again_if_stale
        )

    async def _lift(self, job_id: str) -> None:
        """The job's customer's rollups that its steps delete, into the base tables first
        (`Store.lift`), so that no step writes their files again; which meters' are (the
        steps take every other's the slow way)."""
        lift = await self._store.read_now(void_jobs.to_lift, job_id)
        if lift is not None and await self._store.lift(lift.relations, lift.where, lift.params):
            self._lifted[job_id] = lift.meters

    async def _run(self, job_id: str) -> None:
        chunk = self._chunk
        # The writer's bound, of the step's own time on it (what it reads first, off the
        # writer, does not count): each step stops another tenant's writes once, so fewer,
        # larger ones stop them less often.
        target_seconds = self._store.writer.job_bound_seconds
        seqs: np.ndarray | None = None

        async def step() -> bool:
            nonlocal chunk, seqs
            if job_id not in self._lifted:
                self._lifted[job_id] = _NONE
                await self._lift(job_id)
            if seqs is None:
                found = await self._store.read_behind(void_jobs.matched_seqs, job_id)
                seqs = found.to_numpy()
            up_to = int(seqs[chunk - 1]) if chunk < len(seqs) else _THROUGH
            started = time.perf_counter()
            done = await self._step(job_id, up_to)
            if done is None or done.done:
                log.info("void job %s done", job_id)
                self._lifted.pop(job_id, None)
                return True
            seqs = seqs[np.searchsorted(seqs, done.done_to, side="right") :]
            log.debug(
                "void job %s: %d events voided in %.3f s, %.3f s of it on the writer",
                job_id,
                done.voided,
                time.perf_counter() - started,
                done.seconds,
            )
            chunk = next_chunk(
                chunk, done.seconds, target_seconds, self._min_chunk, self._max_chunk
            )
            return False

        await self._until_done(f"void job {job_id}", step)
