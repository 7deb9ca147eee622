"""`Store.snapshot`: a copy taken while writes go on holds what was stored when it began, and a
store closed while a copy runs closes (the copy is interrupted, not left holding the file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import duckdb

from aggregator.store import Store


def test_a_snapshot_holds_what_was_stored_when_it_began(tmp_path: Path) -> None:
    async def run() -> dict[str, dict[int, int]]:
        async with Store(tmp_path / "m.duckdb") as store:
            await store.write(
                lambda tx: tx.con.execute("INSERT INTO kafka_offsets VALUES ('t', 0, 7)")
            )
            covered = await store.snapshot(tmp_path / "copy.duckdb")
            await store.write(lambda tx: tx.con.execute("UPDATE kafka_offsets SET next_offset = 9"))
            return covered

    assert asyncio.run(run()) == {"t": {0: 7}}
    copy = duckdb.connect(str(tmp_path / "copy.duckdb"), read_only=True)
    assert copy.execute("SELECT topic, partition, next_offset FROM kafka_offsets").fetchall() == [
        ("t", 0, 7)
    ]
    copy.close()


def test_a_store_closed_while_a_snapshot_runs_closes(tmp_path: Path) -> None:
    async def run() -> None:
        store = Store(tmp_path / "m.duckdb")
        store.open()
        await store.write(
            lambda tx: tx.con.execute(
                "CREATE TABLE big AS SELECT range AS i, md5(range::VARCHAR) AS s"
                " FROM range(3000000)"
            )
        )
        copying = asyncio.ensure_future(store.snapshot(tmp_path / "copy.duckdb"))
        await asyncio.sleep(0.05)  # the copy under way
        await asyncio.to_thread(store.close)  # raised ResourceInUse while the copy ran
        await asyncio.gather(copying, return_exceptions=True)

    asyncio.run(run())
