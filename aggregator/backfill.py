"""Backfill: bring a new or redefined meter's rollups up to date from the stored events.

Each step is one writer job over the next chunk of events (by seq), so ingest interleaves
with a long backfill instead of waiting for it; events ingested meanwhile are already rolled
up live. A chunk is sized so that a step holds the writer about half its job bound, and one
step runs at a time whatever the number of meters backfilling (they take turns), so that many
new meters cannot fill the writer's groups. Unfinished backfills resume when the process starts
again.

A step that fails is retried with exponential backoff, logged when the backfill starts failing
and when it recovers, not at every attempt. A meter DuckDB cannot evaluate is marked failed by
the step itself (the writer's repair), which ends its backfill until it is redefined.

In Kafka mode each step is a group of the journal (`intake.journal`, an entry naming the meter,
its version and the step's size), so that every core applies it at the same place among the
other groups: a write applied after it (a credit answering the customer meter, a hold checked
against the balance) then sees the same usage on every core, whatever its own background work.
A core that follows (`intake.leadership`) runs no step of its own: it applies the journal's
(`replay`), and its backfills wait to step until it leads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from aggregator.intake.journal import BACKFILL, Entry, Journal, Records
from aggregator.intake.leadership import Role
from aggregator.store import Outcome, Positions, Store, backfill_step_job, pending_backfills
from ingest.tasks import Backoff, KeyedTasks, next_chunk
from meters.commands import Command
from meters.times import now_us

log = logging.getLogger(__name__)


class Backfiller:
    """Runs one backfill task per meter. An async context manager: exit cancels the tasks
    (their progress is committed step by step, so they resume on the next start)."""

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
        """`journal`: steps are its groups (Kafka mode), run only while this core leads
        (`role`; None: always)."""
        self._store = store
        self._journal = journal
        self._role = role or Role(leading=True)
        self._chunk = chunk_events
        self._max_chunk = max_chunk_events
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._tasks = KeyedTasks("backfiller")
        self._turn = asyncio.Lock()  # FIFO: backfilling meters take turns
        self._detach: Callable[[], None] = lambda: None

    async def __aenter__(self) -> Self:
        if self._journal is not None:
            self._journal.follow(BACKFILL, self)
        for meter_id, version in await self._store.read(pending_backfills):
            self.start(meter_id, version)
        # A meter made or redefined by a write record, however it came (this core's API, or
        # the control topic written by another).
        self._detach = self._store.listeners.attach_applied(self._on_applied)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._detach()
        await self._tasks.cancel()

    async def _step(self, meter_id: str, version: int, chunk: int) -> tuple[int, int] | None:
        step = backfill_step_job(meter_id, version, chunk)
        if self._journal is None:
            return await self._store.write(step)
        # A core catching up applies the journal's steps first: a backfill they finished (or
        # ended) appends nothing more.
        await self._journal.started()
        await self._role.until(True)
        if (meter_id, version) not in await self._store.read_now(pending_backfills):
            return None
        entry = Entry(BACKFILL, (), now_us(), backfill=(meter_id, version, chunk))
        return await self._journal.append_job(entry, step)

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        """A journal entry's step (`journal.Follower`)."""
        assert entry.backfill is not None
        await self._store.queued_at(backfill_step_job(*entry.backfill), positions)

    def _on_applied(self, command: Command, outcome: Outcome) -> None:
        ok, row = outcome
        made = command.kind == "meter.create"
        if ok and (made or (command.kind == "meter.update" and row.backfilling)):
            self.start(row.id, row.version)

    def start(self, meter_id: str, version: int) -> None:
        """Backfill `meter_id` at definition `version`; a running older one stops by itself."""
        key = f"{meter_id}:{version}"
        self._tasks.start(key, lambda: self._run(meter_id, version), key)

    async def _run(self, meter_id: str, version: int) -> None:
        chunk = self._chunk
        # Half the writer's bound: the step's time includes waiting for the group before it.
        target_seconds = self._store.writer.job_bound_seconds / 2
        backoff = Backoff(self._retry, self._max_retry, f"backfill of meter {meter_id}")
        while True:
            try:
                async with self._turn:
                    started = time.perf_counter()
                    progress = await self._step(meter_id, version, chunk)
            except Exception as exc:  # noqa: BLE001 - every failure is retried, logged once
                await backoff.failed(exc)
                continue
            backoff.succeeded()
            elapsed = time.perf_counter() - started
            if progress is None:
                # Redefined, archived or deleted since (a newer backfill owns it), or failed.
                log.info("backfill of meter %s (version %d) ended", meter_id, version)
                return
            done, target = progress
            if done >= target:
                log.info("backfill of meter %s done", meter_id)
                return
            chunk = next_chunk(chunk, elapsed, target_seconds, 1_000, self._max_chunk)
