"""Credit plans' cycles: a background task processing every due plan boundary.

Each run processes every boundary up to now in writer jobs of at most half the writer's job
bound each (other writes go in between); it runs at start, so boundaries missed while the
process was down are processed then, exactly once (the plan's cycle count moves with the
credits in one transaction).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

from aggregator.store import Store, cycle_due_job, plan_tables
from meters.times import now_us

log = logging.getLogger(__name__)


class PlanCycler:
    """An async context manager running the plans' cycles every `every_seconds`."""

    def __init__(
        self, store: Store, *, every_seconds: float = 1.0, clock: Callable[[], int] = now_us
    ) -> None:
        self._store = store
        self._every = every_seconds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.run_due()
        self._task = asyncio.create_task(self._loop(), name="credit-plans")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run_due(self) -> int:
        """Process every boundary at or before now; returns how many."""
        budget = self._store.writer.job_bound_seconds / 2
        # A cycle job waits for applied events to be stored: only when one is due.
        processed, more = 0, await self._store.read_now(plan_tables.due, self._clock())
        while more:
            done, more = await self._store.write(cycle_due_job(self._clock(), budget))
            processed += done
        if processed:
            log.info("credit plans: %d cycle(s) processed", processed)
        return processed

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.run_due()
            except Exception:
                log.exception("credit plan cycles failed; retrying")
