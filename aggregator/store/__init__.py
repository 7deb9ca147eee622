"""The DuckDB store: one file, one writer thread, a few reader threads.

This package is the only place with SQL. Writes are jobs run by `Writer` (group commit);
reads run on per-thread cursors off the event loop, each interrupted past `read_timeout_seconds`
(one tenant's heavy query must not hold a reader thread that every tenant shares).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import duckdb

from aggregator.errors import QueryTimeout
from aggregator.store.compaction import compact
from aggregator.store.events import SequenceCounter
from aggregator.store.schema import migrate
from aggregator.store.writer import DEFAULT_JOB_BOUND_SECONDS, Job, Writer

T = TypeVar("T")

__all__ = ["Store"]


class Store:
    """Owns the DuckDB file. Use as an async context manager; closing drains pending writes."""

    def __init__(
        self,
        path: Path | str,
        *,
        readers: int = 4,
        memory_limit: str | None = None,
        checkpoint_threshold: str = "256MB",
        read_timeout_seconds: float = 30.0,
        job_bound_seconds: float = DEFAULT_JOB_BOUND_SECONDS,
        compact_seconds: float = 1.0,
    ):
        self.path = str(path)
        # DuckDB's default (16 MiB of WAL) checkpoints every ~40k events, each a stall of the
        # writer; at 256 MiB the writer sustained 1.5x the events/s (benchmarks/README.md),
        # at the price of a longer WAL replay after a crash.
        self._checkpoint_threshold = checkpoint_threshold
        self._readers = readers
        self._read_timeout = read_timeout_seconds
        self._job_bound = job_bound_seconds
        # How often appended deltas are folded into the keyed tables (`compaction`) while
        # writes keep coming: fewer, larger folds cost less per event; reads merge the rest.
        self._compact_seconds = compact_seconds
        self._memory_limit = memory_limit
        self._con: duckdb.DuckDBPyConnection | None = None
        self._writer: Writer | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self.seq: SequenceCounter | None = None

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def open(self) -> None:
        if self._con is not None:
            raise RuntimeError("store already open")
        config: dict[str, str | bool | int | float | list[str]] = {
            "checkpoint_threshold": self._checkpoint_threshold
        }
        if self._memory_limit:
            config["memory_limit"] = self._memory_limit
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(self.path, config=config)
        # Set after connecting: the (built-in) ICU extension loads on first use.
        self._con.execute("SET GLOBAL TimeZone = 'UTC'")
        migrate(self._con)
        self.seq = SequenceCounter.load(self._con)
        self._writer = Writer(
            self._con.cursor(),
            job_bound_seconds=self._job_bound,
            upkeep=compact,
            upkeep_seconds=self._compact_seconds,
        )
        self._writer.start()
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="duckdb-reader")

    def close(self) -> None:
        if self._con is None:
            return
        assert self._writer is not None and self._pool is not None
        self._writer.close()
        self._pool.shutdown(wait=True)
        for cursor in self._cursors:
            cursor.close()
        self._con.close()
        self._con = None

    @property
    def writer(self) -> Writer:
        assert self._writer is not None, "store is not open"
        return self._writer

    async def write(self, job: Job[T], weight: int = 1, tenant: str | None = None) -> T:
        """Run `job` in a group commit (`tenant`'s share of the writer); returns after the
        commit."""
        return await self.writer.submit(job, weight, tenant)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(cursor, *args, **kwargs)` on a reader thread; QueryTimeout past the read
        timeout (the query is interrupted, and one still waiting for a thread never starts)."""
        assert self._pool is not None, "store is not open"
        running: list[duckdb.DuckDBPyConnection] = []
        given_up = threading.Event()

        def run() -> T:
            if given_up.is_set():
                raise QueryTimeout(self._read_timeout)
            cursor = self._cursor()
            running.append(cursor)
            return fn(cursor, *args, **kwargs)

        future = asyncio.get_running_loop().run_in_executor(self._pool, run)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._read_timeout)
        except TimeoutError:
            given_up.set()
            if running:
                running[0].interrupt()
            # Retrieved, so that its (interrupted) outcome is not reported as never retrieved.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise QueryTimeout(self._read_timeout) from None

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cursor is None:
            assert self._con is not None
            cursor = self._con.cursor()
            self._cursors.append(cursor)
            self._local.cursor = cursor
        return cursor
