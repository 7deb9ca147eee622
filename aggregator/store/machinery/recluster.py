"""The reclusterer: a thread of its own (with its own DuckDB cursor) that rewrites the rollup
tables sorted (`compaction.recluster`) once their unsorted deltas are worth it.

A rollup table is rewritten when its deltas reach `ratio` of its rows (at least `min_rows`),
or a tenth of that when none came for `quiet_seconds` (after a backfill, a burst). Each rewrite
costs the table's size, so with the ratio each row is rewritten a few times over its life;
readers scan at most that share of unsorted rows beside the sorted table. It runs beside the
flusher, which only appends deltas meanwhile; a job that deletes rollups at the same time (a
meter redefined) conflicts with it, and one of the two runs again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import duckdb

from aggregator.store.machinery.compaction import CLUSTERED, recluster

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReclusterSettings:
    ratio: float = 0.25
    min_rows: int = 50_000
    quiet_seconds: float = 5.0
    check_seconds: float = 1.0


class Reclusterer:
    def __init__(self, con: duckdb.DuckDBPyConnection, settings: ReclusterSettings) -> None:
        self._con = con
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duckdb-recluster", daemon=True)
        # Per table: (deltas seen last, when that count was first seen).
        self._seen: dict[str, tuple[int, float]] = {}
        self.rewrites = 0
        self.longest_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop (a rewrite in progress finishes first: it is one transaction)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._settings.check_seconds):
            for table in CLUSTERED:
                try:
                    if self._due(table):
                        self._rewrite(table)
                except duckdb.Error:  # a conflict, or the store closing: next time
                    log.info("rewriting %s sorted: retrying later", table, exc_info=True)

    def _due(self, table: str) -> bool:
        deltas = CLUSTERED[table][0]
        pending = _count(self._con, deltas)
        now = time.monotonic()
        seen, since = self._seen.get(table, (-1, now))
        if pending != seen:
            self._seen[table] = (pending, now)
            since = now
        settings = self._settings
        if pending < settings.min_rows:
            return False
        rows = _count(self._con, table)
        # When quiet, a tenth of the share is worth it: no more writes are coming to wait for.
        quiet = now - since >= settings.quiet_seconds and pending >= settings.ratio / 10 * rows
        return pending >= settings.ratio * rows or quiet

    def _rewrite(self, table: str) -> None:
        started = time.perf_counter()
        rows = recluster(self._con, table)
        seconds = time.perf_counter() - started
        self.rewrites += 1
        self.longest_seconds = max(self.longest_seconds, seconds)
        self._seen.pop(table, None)
        log.debug("rewrote %s sorted: %d rows in %.2f s", table, rows, seconds)


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])  # noqa: S608 - fixed text, values bound
