"""Backfill: bring a new or redefined meter's rollups up to date from the stored events.

Each step is one writer job over the next chunk of events (by seq), so ingest interleaves
with a long backfill instead of waiting for it; events ingested meanwhile are already rolled
up live. A chunk is sized so that a step holds the writer about half its job bound, and one
step runs at a time whatever the number of meters backfilling (they take turns, `loop.Steps`),
so that many new meters cannot fill the writer's groups. Unfinished backfills resume when the
process starts again. A meter DuckDB cannot evaluate is marked failed by the step itself (the
writer's repair), which ends its backfill until it is redefined.

In Kafka mode each step is a group of the journal (an entry naming the meter, its version and
the step's size: `loop`), so that a write applied after it (a credit answering the customer
meter, a hold checked against the balance) sees the same usage on every core, whatever its own
background work.
"""

from __future__ import annotations

import logging
import time

from aggregator.background.loop import Steps
from aggregator.intake.journal import BACKFILL, Entry, Journal, Records
from aggregator.intake.leadership import Role
from aggregator.store import Outcome, Positions, Store, backfill_step_job, pending_backfills
from ingest.tasks import next_chunk
from meters.commands import Command
from meters.times import now_us

log = logging.getLogger(__name__)


class Backfiller(Steps):
    """Runs one backfill task per meter. An async context manager: exit cancels the tasks
    (their progress is committed step by step, so they resume on the next start)."""

    kind = BACKFILL
    what = "backfiller"

    def __init__(
        self,
        store: Store,
        *,
        chunk_events: int = 20_000,
        max_chunk_events: int = 1_000_000,
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
        self._max_chunk = max_chunk_events

    async def _resume(self) -> None:
        for meter_id, version in await self._store.read(pending_backfills):
            self.start(meter_id, version)

    def on_applied(self, command: Command, outcome: Outcome) -> None:
        ok, row = outcome
        made = command.kind == "meter.create"
        if ok and (made or (command.kind == "meter.update" and row.backfilling)):
            self.start(row.id, row.version)

    def start(self, meter_id: str, version: int) -> None:
        """Backfill `meter_id` at definition `version`; a running older one stops by itself."""
        key = f"{meter_id}:{version}"
        self._tasks.start(key, lambda: self._run(meter_id, version), key)

    async def _step(self, meter_id: str, version: int, chunk: int) -> tuple[int, int] | None:
        step = backfill_step_job(meter_id, version, chunk)
        if self._journal is None:
            return await self._store.write(step)

        async def due() -> bool:  # a backfill the journal's steps finished (or ended): not
            return (meter_id, version) in await self._store.read_now(pending_backfills)

        if not await self.leading(due):
            return None
        entry = Entry(BACKFILL, (), now_us(), backfill=(meter_id, version, chunk))
        return await self._journal.append_job(entry, step)

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        assert entry.backfill is not None
        await self._store.queued_at(backfill_step_job(*entry.backfill), positions)

    async def _run(self, meter_id: str, version: int) -> None:
        chunk = self._chunk
        # Half the writer's bound: the step's time includes waiting for the group before it.
        target_seconds = self._store.writer.job_bound_seconds / 2

        async def step() -> bool:
            nonlocal chunk
            started = time.perf_counter()
            progress = await self._step(meter_id, version, chunk)
            if progress is None:
                # Redefined, archived or deleted since (a newer backfill owns it), or failed.
                log.info("backfill of meter %s (version %d) ended", meter_id, version)
                return True
            done, target = progress
            if done >= target:
                log.info("backfill of meter %s done", meter_id)
                return True
            elapsed = time.perf_counter() - started
            chunk = next_chunk(chunk, elapsed, target_seconds, 1_000, self._max_chunk)
            return False

        await self._until_done(f"backfill of meter {meter_id}", step)
