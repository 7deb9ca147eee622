"""Backfill: bring a new or redefined meter's rollups up to date from the stored events.

Each step is one writer job over the next chunk of events (by seq), so ingest interleaves
with a long backfill instead of waiting for it; events ingested meanwhile are already rolled
up live. Unfinished backfills resume when the process starts again.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Self

from aggregator.store import Store
from aggregator.store.meters import backfill_step_job, pending_backfills

log = logging.getLogger(__name__)


class Backfiller:
    """Runs one backfill task per meter. An async context manager: exit cancels the tasks
    (their progress is committed step by step, so they resume on the next start)."""

    def __init__(self, store: Store, *, chunk_events: int = 200_000) -> None:
        self._store = store
        self._chunk = chunk_events
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> Self:
        for meter_id, version in await self._store.read(pending_backfills):
            self.start(meter_id, version)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def start(self, meter_id: str, version: int) -> None:
        """Backfill `meter_id` at definition `version`; a running older one stops by itself."""
        key = f"{meter_id}:{version}"
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._run(meter_id, version), name=key)
            self._tasks[key].add_done_callback(lambda _: self._tasks.pop(key, None))

    async def _run(self, meter_id: str, version: int) -> None:
        while True:
            try:
                progress = await self._store.write(
                    backfill_step_job(meter_id, version, self._chunk)
                )
            except Exception:
                log.exception("backfill of meter %s failed; retrying", meter_id)
                await asyncio.sleep(5)
                continue
            if progress is None:
                return  # redefined, archived or deleted since: a newer backfill owns it
            done, target = progress
            if done >= target:
                log.info("backfill of meter %s done (%d events)", meter_id, target)
                return
