"""A read past the store's read timeout is interrupted: it answers QueryTimeout and gives its
reader thread back, so one tenant's heavy queries cannot hold the threads every tenant uses."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import duckdb
import pytest

from aggregator.errors import QueryTimeout
from aggregator.store import Store


def _endless(con: duckdb.DuckDBPyConnection) -> int:
    return int(
        con.execute("SELECT count(*) FROM range(1000000000000) WHERE range % 7 = 3").fetchall()[0][
            0
        ]
    )


def _one(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT 1").fetchall()[0][0])


def test_a_long_read_is_interrupted_and_frees_its_thread(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb", readers=2, read_timeout_seconds=0.5) as store:
        started = time.perf_counter()
        # More heavy reads than reader threads: the queued ones never start.
        results = await asyncio.gather(
            *(store.read(_endless) for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(r, QueryTimeout) for r in results), results
        assert time.perf_counter() - started < 5
        started = time.perf_counter()
        assert await store.read(_one) == 1
        assert time.perf_counter() - started < 2
        with pytest.raises(QueryTimeout, match="narrow"):
            await store.read(_endless)


def test_a_cancelled_read_is_cancelled_even_when_its_query_just_finished(tmp_path: Path) -> None:
    """A task cancelled while its read is finishing must end cancelled: a loop that caught the
    answer instead would run on past its own shutdown (Python 3.11's `wait_for` returns the
    answer when the cancellation and the result meet, which hung the forwarder's shutdown)."""
    asyncio.run(_cancelled_reads(tmp_path))


async def _cancelled_reads(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb", read_timeout_seconds=30) as store:
        # Every loop turn between the query's end and the reading task's wake-up.
        for turns in range(8):
            for read in (store.read, store.read_now):
                finished = threading.Event()

                def query(con: duckdb.DuckDBPyConnection, done: threading.Event = finished) -> int:
                    done.set()
                    return _one(con)

                task = asyncio.create_task(read(query))
                await asyncio.to_thread(finished.wait)
                # The loop held while the thread's answer is queued on it.
                time.sleep(0.05)  # noqa: ASYNC251
                for _ in range(turns):
                    await asyncio.sleep(0)
                if task.cancel():
                    await asyncio.gather(task, return_exceptions=True)
                    assert task.cancelled(), (read.__name__, turns, task.result())
