"""A read past the store's read timeout is interrupted: it answers QueryTimeout and gives its
reader thread back, so one tenant's heavy queries cannot hold the threads every tenant uses."""

from __future__ import annotations

import asyncio
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
