"""The continuous export: every current event of the store, exactly once, in the events table of
the target (`table`), while this core leads.

The protocol, each step named where the code takes it:

1. Position: read the last seq this exporter committed from a fresh snapshot of the table
   (its application transaction; 0 for a new table). Nothing is kept in the store: the table's
   log is the one record of what it holds.
2. Read: the current events of the next `max_events` seqs after the position (or after the
   seqs read since that held none), in seq order, and the last seq that read covers.
3. Append: commit them with that seq as the new position, based on the snapshot of step 1.
   A crash before the commit leaves neither (the next start reads them again); after it,
   both. If another writer committed for the same exporter id since (a leader that lost its
   lease without knowing), Delta refuses the commit: go back to step 1.
4. Corrections: when the store's count of voided events changed (and once at start), the
   voided events the table may hold (seq up to the position, not known absent since) are
   looked up in it and deleted.
   An amendment voids its earlier version and stores the new one with a new seq, which step
   3 appends: together, a replacement. A delete is idempotent: a crash before it is repeated.
5. Idle for `idle_seconds` when nothing is left, then step 2.

Beside it, every `usage_every_seconds`, each customer meter's usage per day is refreshed in a
table of its own (`usage`).

The exporter's id is the shard's (`meterline/<index>/<count>`): the cores of one shard share
it, so a new leader goes on from the old one's commits. A shard that a split made goes on from
its old shard's position until it has committed one of its own (`ancestors`): its data dir is
the old shard's, whose exporter stopped when it retired, and its seqs go on from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import numpy as np

from aggregator.export.table import EventsTable, Stale
from aggregator.export.usage import UsageRefresher
from aggregator.intake.leadership import Role
from aggregator.settings import ExportSettings
from aggregator.store import Store, export_reads, shard_splits
from ingest.tasks import cancel_within
from meters.times import now_us

log = logging.getLogger(__name__)


class Exporter:
    """Runs in the background while open and this core leads. An async context manager."""

    def __init__(self, store: Store, settings: ExportSettings, *, role: Role | None = None) -> None:
        self._store = store
        self._settings = settings
        self._role = role or Role(leading=True)
        self._table = EventsTable(settings.to, settings.app_id)
        self.usage = UsageRefresher(store, settings)
        self._tasks: list[asyncio.Task[None]] = []
        self.position: int | None = None  # the last seq in the table (None: not read yet)
        self._read = 0  # the last seq read: the position, or past it over seqs with no event
        self.exported = 0  # events appended since start
        self.deleted = 0  # voided events removed since start
        self.commits = 0
        self.last_commit_us: int | None = None
        self.last_error: str | None = None
        self._voids_seen = -1  # the voided count last reconciled (-1: not yet)
        # The seqs of voided events known not to be in the table (sorted): looked up once.
        self._absent = np.empty(0, np.int64)

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._run(), name="exporter"),
            asyncio.create_task(self._refreshing(), name="exporter-usage"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A batch being written is abandoned: it is not committed, or it is and the position
        # says so (step 3).
        await cancel_within(*self._tasks, what="exporter")

    @property
    def table_uri(self) -> str:
        return self._table.uri

    @property
    def exporting(self) -> bool:
        """Whether this core exports now (it leads)."""
        return self._role.leading

    async def lag(self) -> tuple[int, float]:
        """(current events not exported yet, seconds since the oldest of them was ingested);
        none on a core that follows: the leader exports, and its figures are the table's."""
        if not self.exporting:
            return 0, 0.0
        events, oldest_us = await self._store.read(export_reads.lag, self._read)
        return events, 0.0 if oldest_us is None else max(0.0, (now_us() - oldest_us) / 1e6)

    async def _run(self) -> None:
        while True:
            await self._role.until(True)
            try:
                if not await self.step():
                    await asyncio.sleep(self._settings.idle_seconds)
            except asyncio.CancelledError:
                raise
            except Stale as exc:  # step 3: another writer moved the position
                log.warning("export: %s; reading the position again", exc)
                self.position = None
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.position = None
                log.exception("export failed; retrying")
                await asyncio.sleep(self._settings.retry_seconds)

    async def _refreshing(self) -> None:
        while True:
            await self._role.until(True)
            try:
                await self.usage.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"usage: {type(exc).__name__}: {exc}"
                log.exception("refreshing the usage table failed; retrying")
            await asyncio.sleep(self._settings.usage_every_seconds)

    async def step(self) -> bool:
        """One round of steps 1 to 4: whether anything was read, appended or deleted."""
        if self.position is None:  # step 1
            splits = await self._store.read(shard_splits.splits)
            older = ancestors(self._settings.app_id, splits)
            self.position = self._read = await asyncio.to_thread(self._table.position, older)
        rows, through = await self._store.read(  # step 2
            export_reads.events_after, self._read, self._settings.max_events
        )
        moved = through > self._read
        if rows.num_rows:
            await asyncio.to_thread(self._table.append, rows, through)  # step 3
            self.position = through
            self.exported += rows.num_rows
            self.commits += 1
            self.last_commit_us = now_us()
            self.last_error = None
        self._read = through
        return await self._corrections() or moved  # step 4

    async def _corrections(self) -> bool:
        count = await self._store.read(export_reads.voided_count)
        if count == self._voids_seen:
            return False
        assert self.position is not None
        seqs, ids = await self._store.read(export_reads.voided, self.position)
        new = ~np.isin(seqs, self._absent, assume_unique=True)
        looked = [i for i, n in zip(ids, new, strict=True) if n]
        held = await asyncio.to_thread(self._table.holding, looked) if looked else []
        if held:
            started = time.perf_counter()
            self.deleted += await asyncio.to_thread(self._table.delete, held)
            took = time.perf_counter() - started
            log.info("export: %d voided events deleted in %.2f s", len(held), took)
        self._absent = np.union1d(self._absent, seqs[new])
        self._voids_seen = count
        return bool(held)


def ancestors(app_id: str, splits: Sequence[shard_splits.Split]) -> list[str]:
    """The exporter ids of the shards this one's data dir comes from, nearest first: for each
    split that made its shard (this data dir among the new ones), the old shard it went on
    from (`intake.splits`, step 4). An id not of the form `<prefix>/<index>/<count>` has none."""
    prefix, _, shard = app_id.rpartition("/")
    prefix, _, index_text = prefix.rpartition("/")
    if not (index_text.isdigit() and shard.isdigit()):
        return []
    index, count, found = int(index_text), int(shard), []
    for split in reversed(splits):
        if split.origin and split.to_count == count:
            index, count = index % split.from_count, split.from_count
            found.append(f"{prefix}/{index}/{count}")
    return found
