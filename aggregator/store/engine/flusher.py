"""The flusher: a thread of its own (with its own DuckDB cursor) that stores applied batches.

It stores the memtable (its events and rollups as new files, `segments`; the rest in tables)
once it holds a row group of events, once its oldest batch has waited `flush_seconds`, or at
once when asked (`barrier`: a read that must see every applied event, a write that must come
after them); then the ingest log's segments it completed are deleted. Between flushes it
takes the ledger's checkpoint when due (`ledger_log.Checkpoint`), runs DuckDB's `CHECKPOINT`
once the WAL passes `checkpoint_bytes` and the disk has room for it (the ingest path writes
nothing to DuckDB, so a checkpoint never holds it up), and runs `idle` (upkeep of the
in-memory state, off the writer's thread).

`exclusive` is held while it writes; a writer job that must not run beside it (any job but
applying events) takes it, flushes what is left (`flush_all`) and keeps it until it commits.

A flush that fails is retried every `retry_seconds` with the same batches (nothing is lost:
they stay in the memtable, and in Kafka or the ingest log); barriers wait for it. While one
has met a full disk (`disk_full`), the ingest log takes no request (`Live.prepare`): what piles
up unstored while the disk is full must fit in the WAL once space is freed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from aggregator.store.base.rows import transaction
from aggregator.store.engine import disk, memtable
from aggregator.store.engine.disk import DiskHealth
from aggregator.store.engine.ingest_log import IngestLog
from aggregator.store.engine.ledger_log import Checkpoint
from aggregator.store.engine.memtable import ROW_GROUP, Memtable
from aggregator.store.engine.segments import Change, Segments
from aggregator.store.metering.groups import Bound
from meters.times import NEVER

log = logging.getLogger(__name__)

CHECKPOINT_MARGIN = 4 * 1024 * 1024  # room a checkpoint needs beyond what its WAL holds


class Flusher:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        table: Memtable,
        log: IngestLog,
        segments: Segments,
        *,
        wal: Path | None,
        flush_events: int = ROW_GROUP,
        flush_seconds: float = 1.0,
        ledger: Checkpoint | None = None,
        checkpoint_bytes: int = 16 * 1024 * 1024,
        retry_seconds: float = 1.0,
        idle: Callable[[], object] = lambda: None,
        disk: DiskHealth | None = None,
        bound: Bound,
    ) -> None:
        self._con = con
        self._bound = bound
        self._disk = disk
        self._table = table
        self._log = log
        self._segments = segments
        self._wal = wal
        self.flush_events = flush_events
        self.flush_seconds = flush_seconds
        self._ledger = ledger
        self._checkpoint_bytes = checkpoint_bytes
        self._retry_seconds = retry_seconds
        self._idle = idle
        self.exclusive = threading.RLock()
        self._wake = threading.Condition()
        self._barriers: list[tuple[int, concurrent.futures.Future[None]]] = []
        self._stopping = False
        self._failed_at = NEVER
        self._full_logged_at = NEVER
        self._deferred_logged_at = NEVER
        self.disk_full = False  # the last flush met a full disk
        self._thread = threading.Thread(target=self._run, name="duckdb-flusher", daemon=True)
        self.flushes = 0
        self.flushed_events = 0
        self.wal_folds = 0  # DuckDB CHECKPOINTs run (`_fold_wal`)
        self.longest_seconds = 0.0  # the longest time it held `exclusive`

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Store everything applied, take the ledger's checkpoint, then stop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        with self.exclusive:
            self.flush_all()
            if self._ledger is not None:
                try:
                    self.checkpoint_ledger()  # a start then reads one file
                except Exception:  # the next start reads the changes since the last one
                    log.exception("the ledger's checkpoint at stop failed")

    def checkpoint_ledger(self) -> None:
        """Take the ledger's checkpoint now, if anything was written since the last."""
        assert self._ledger is not None, "no ledger checkpoints"
        with self.exclusive:
            self._ledger.take(self._con, self._store_all)

    def poke(self) -> None:
        """Batches were added: check the thresholds."""
        if self._table.events >= self.flush_events:
            with self._wake:
                self._wake.notify()

    def barrier(self) -> asyncio.Future[None]:
        """Resolves once every batch applied before the call is stored."""
        mark = self._table.added
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._table.stored >= mark:
            future.set_result(None)
        else:
            with self._wake:
                self._barriers.append((mark, future))
                self._wake.notify()
        return asyncio.wrap_future(future)

    def flush_all(self) -> None:
        """Store every applied batch now (the caller holds `exclusive`); raises if it fails."""
        entries = self._table.take()
        if not entries:
            return
        started = time.perf_counter()
        con = self._con
        change = Change()
        listed = False
        try:
            with transaction(con):
                logged, change = memtable.store(con, entries, self._segments, self._bound)
            listed = True
        finally:
            if not listed:
                self._segments.abandon(change)
        self._segments.committed(change)
        self._table.release(len(entries))
        if logged is not None:
            self._log.stored(logged)
        self.disk_full = False
        events = sum(e.events.num_rows for e in entries)
        self.flushes += 1
        self.flushed_events += events
        log.debug(
            "stored %d batches (%d events) in %.3f s",
            len(entries),
            events,
            time.perf_counter() - started,
        )
        self._settle_barriers()

    def _store_all(self) -> bool:
        """`flush_all`; whether every applied batch is stored (the ledger's checkpoint)."""
        self.flush_all()
        return self._table.stored >= self._table.added

    def _settle_barriers(self) -> None:
        with self._wake:
            stored = self._table.stored
            waiting = []
            for mark, future in self._barriers:
                if stored >= mark:
                    future.set_result(None)
                else:
                    waiting.append((mark, future))
            self._barriers = waiting

    def _due(self) -> bool:
        table = self._table
        if table.stored >= table.added:
            return False
        if time.monotonic() - self._failed_at < self._retry_seconds:
            return False
        return bool(
            self._barriers
            or self._stopping
            or table.events >= self.flush_events
            or table.age() >= self.flush_seconds
        )

    def _failed(self, exc: Exception) -> None:
        """Count a failed flush; a full disk is logged once a minute, not at every retry."""
        self._failed_at = time.monotonic()
        if self._disk is not None and disk.fatal(exc):
            self._disk.lost(exc)
        if disk.full(exc):
            self.disk_full = True
            if self._disk is not None:
                self._disk.failed(exc)
            if self._failed_at - self._full_logged_at < 60:
                return
            self._full_logged_at = self._failed_at
        log.error("storing applied events failed; retrying", exc_info=exc)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                if not self._due():
                    self._wake.wait(timeout=min(0.05, self.flush_seconds))
                flush = self._due()
            started = time.perf_counter()
            with self.exclusive:
                if flush:
                    try:
                        self.flush_all()
                    except Exception as exc:  # noqa: BLE001 - logged; retried with the same batches
                        self._failed(exc)
                    else:
                        if self._disk is not None:
                            self._disk.succeeded()
                self._upkeep()
                self.longest_seconds = max(self.longest_seconds, time.perf_counter() - started)
            try:
                self._idle()
            except Exception:  # upkeep of memory: retried next time
                log.exception("in-memory upkeep failed")

    def _upkeep(self) -> None:
        """The ledger's checkpoint and folding the WAL, between flushes (the caller holds
        `exclusive`)."""
        if self._ledger is not None:
            try:
                if self._ledger.due():
                    self._ledger.take(self._con, self._store_all)
            except Exception:
                log.exception("the ledger's checkpoint failed; retrying later")
        self._fold_wal()

    def _fold_wal(self) -> None:
        """DuckDB's CHECKPOINT (the WAL folded into the file; not the hot state's checkpoints,
        `checkpoints`) once the WAL holds `checkpoint_bytes` and the disk has room for it."""
        wal = 0 if self._wal is None else _size(self._wal)
        if wal < self._checkpoint_bytes or not self._room_to_checkpoint(wal):
            return
        try:
            self._con.execute("CHECKPOINT")
            self.wal_folds += 1
        except duckdb.Error as exc:
            if self._disk is not None and disk.fatal(exc):
                self._disk.lost(exc)
                log.critical("the database was invalidated; restart the server", exc_info=exc)
            else:  # another transaction is open: next time
                log.debug("checkpoint skipped", exc_info=True)

    def _room_to_checkpoint(self, wal: int) -> bool:
        """Whether the disk has room to checkpoint a WAL of `wal` bytes: what the WAL holds
        (stored compressed, it takes less) beyond the file's free blocks, and
        `CHECKPOINT_MARGIN`. A checkpoint that cannot write the file invalidates the whole
        database until a restart (a commit that cannot write the WAL only fails), so it waits
        for room, the WAL growing meanwhile, and says so once a minute."""
        if self._disk is None:
            return True
        block, free_blocks = self._con.execute(
            "SELECT block_size, free_blocks FROM pragma_database_size()"
        ).fetchone() or (0, 0)
        needed = max(0, wal - block * free_blocks) + CHECKPOINT_MARGIN
        free = self._disk.free_bytes()
        if free >= needed:
            return True
        now = time.monotonic()
        if now - self._deferred_logged_at >= 60:
            self._deferred_logged_at = now
            log.warning("checkpoint deferred: %d bytes free of the %d it may need", free, needed)
        return False


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
