"""The merger: a thread of its own (with its own DuckDB cursor) that merges segments
(`segments`, step 3) and deletes retired files once their grace has passed (step 4).

A merge reads and writes its file off every lock, then lists it in place of its inputs under
the store's `exclusive` lock (which flushes and jobs that delete rows hold while they change
the list), if its inputs are all still listed (a job may have rewritten one meanwhile: then its
file is deleted, and the next check merges again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager

import duckdb

from aggregator.store.base.rows import transaction
from aggregator.store.engine.segments import Change, Segment, Segments, SegmentsChanged

log = logging.getLogger(__name__)


class Merger:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        segments: Segments,
        exclusive: AbstractContextManager[object],
        *,
        check_seconds: float = 0.5,
    ) -> None:
        self._con = con
        self._segments = segments
        self._exclusive = exclusive
        self._check_seconds = check_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segment-merger", daemon=True)
        self.merges = 0
        self.longest_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop (a merge in progress finishes first)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._check_seconds):
            try:
                while not self._stop.is_set() and self.merge_once():
                    pass
                self._segments.delete_retired()
            except Exception:
                log.warning("merging segments: retrying later", exc_info=True)

    def merge_once(self) -> bool:
        """Merge the files of one level that are due, if any; whether one was."""
        inputs = self._segments.due()
        if not inputs:
            return False
        started = time.perf_counter()
        self.list_merged(inputs, self._segments.merge(self._con, inputs))
        seconds = time.perf_counter() - started
        self.merges += 1
        self.longest_seconds = max(self.longest_seconds, seconds)
        log.debug("merged %d %s files in %.2f s", len(inputs), inputs[0].relation, seconds)
        return True

    def list_merged(self, inputs: Sequence[Segment], change: Change) -> bool:
        """List a merge's file in place of `inputs` if they are all still listed, else delete
        it; whether it was listed."""
        listed = False
        try:
            with self._exclusive:
                if not self._segments.still_live(inputs):
                    return False
                try:
                    with transaction(self._con):
                        self._segments.commit(self._con, change)
                except SegmentsChanged:
                    return False  # the list in memory was behind the database's
                listed = True
                self._segments.committed(change)
        finally:
            if not listed:
                self._segments.abandon(change)
        return listed
