"""Credit plans' cycles: a background task processing every due plan boundary.

Each run processes every boundary up to now in writer jobs of at most half the writer's job
bound each (other writes go in between); it runs at start, so boundaries missed while the
process was down are processed then, exactly once (the plan's cycle count moves with the
credits in one transaction).

In Kafka mode each job is a group of the journal (an entry naming its time and how many
boundaries at most: `loop`), so that every core processes the same boundaries at the same place
among the other groups.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aggregator.background.loop import Background
from aggregator.intake.journal import PLANS, Entry, Journal, Records
from aggregator.intake.leadership import Role
from aggregator.store import Positions, Store, cycle_due_job, plan_tables
from ingest.tasks import cancel_within
from meters.times import now_us

CYCLES_PER_GROUP = 100  # boundaries in one journal group at most

log = logging.getLogger(__name__)


class PlanCycler(Background):
    """An async context manager running the plans' cycles every `every_seconds`."""

    kind = PLANS

    def __init__(
        self,
        store: Store,
        *,
        every_seconds: float = 1.0,
        clock: Callable[[], int] = now_us,
        journal: Journal | None = None,
        role: Role | None = None,
    ) -> None:
        super().__init__(store, journal, role)
        self._every = every_seconds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def _started(self) -> None:
        if self._journal is None:  # else once the journal has caught up (`_loop`)
            await self.run_due()
        self._task = asyncio.create_task(self._loop(), name="credit-plans")

    async def _stopped(self) -> None:
        await cancel_within(self._task, what="plan cycler")

    async def run_due(self) -> int:
        """Process every boundary at or before now; returns how many."""
        budget = self._store.writer.job_bound_seconds / 2
        # A cycle job waits for applied events to be stored: only when one is due.
        processed, more = 0, await self._store.read_now(plan_tables.due, self._clock())
        while more:
            done, more = await self._cycle(budget)
            processed += done
        if processed:
            log.info("credit plans: %d cycle(s) processed", processed)
        return processed

    async def _cycle(self, budget: float) -> tuple[int, bool]:
        now = self._clock()
        if self._journal is None:
            return await self._store.write(cycle_due_job(now, budget))
        entry = Entry(PLANS, (), now, cycles=CYCLES_PER_GROUP)
        job = cycle_due_job(now, limit=CYCLES_PER_GROUP)
        return await self._journal.append_job(entry, job)

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        await self._store.queued_at(cycle_due_job(entry.at_us, limit=entry.cycles), positions)

    async def _loop(self) -> None:
        if self._journal is not None:
            await self._journal.started()
        while True:
            await asyncio.sleep(self._every)
            await self._role.until(True)
            try:
                await self.run_due()
            except Exception:
                log.exception("credit plan cycles failed; retrying")
