"""Consumed batches commit with their offsets, and only in sequence: a batch that does not
start where the stored offsets end is refused whole (a failed predecessor must be re-read)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pytest

from aggregator.errors import OffsetGap
from aggregator.store import Store
from aggregator.store.apply.consumed import ConsumedBatch, StartOffsets, stored_offsets
from meters.events import Event, to_table
from meters.times import now_us

ORG = "4e1d2c3b-5a69-4f7e-8d0c-1b2a3c4d5e6f"


def _events(*external_ids: str) -> pa.Table:
    now = now_us()
    events = [
        Event("use", now, None, "c1", external_id, None, None, {}, None)
        for external_id in external_ids
    ]
    table = to_table(events)
    table = table.append_column("organization_id", pa.array([ORG] * len(events), pa.string()))
    return table.append_column(
        "ingested_at", pa.array([now] * len(events), pa.timestamp("us", tz="UTC"))
    )


def test_batches_commit_in_sequence_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Store(tmp_path / "c.duckdb") as store:
            first = ConsumedBatch("t", _events("a", "b"), {0: (0, 2)}, now_us())
            assert await store.write(first) == 2
            gap = ConsumedBatch("t", _events("d"), {0: (3, 4)}, now_us())
            with pytest.raises(OffsetGap):
                await store.write(gap)
            assert await store.read(stored_offsets, "t") == {0: 2}
            again = ConsumedBatch("t", _events("b", "c"), {0: (2, 4), 1: (0, 1)}, now_us())
            assert await store.write(again) == 1  # "b" was applied before: a duplicate
            assert await store.read(stored_offsets, "t") == {0: 4, 1: 1}
            count = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()
            )
            assert count == [(3,)]

    asyncio.run(scenario())


def test_a_partition_starts_where_its_log_starts(tmp_path: Path) -> None:
    """A partition with no stored offset gets its log's start stored at assignment, so a batch
    fetched from anywhere else (a group's committed offset, read before the seek landed) is
    refused, not applied with the records before it skipped."""

    async def scenario() -> None:
        async with Store(tmp_path / "c.duckdb") as store:
            await store.write(ConsumedBatch("t", _events("a"), {0: (0, 1)}, now_us()))
            started = await store.write(StartOffsets("t", {0: 0, 1: 7}))
            assert started == {0: 1, 1: 7}  # a stored offset is kept
            assert store.applied_offsets("t") == {0: 1, 1: 7}
            ahead = ConsumedBatch("t", _events("x"), {1: (32, 33)}, now_us())
            with pytest.raises(OffsetGap):
                await store.write(ahead)
            at_start = ConsumedBatch("t", _events("y"), {1: (7, 8)}, now_us())
            assert await store.write(at_start) == 1
            assert await store.read(stored_offsets, "t") == {0: 1, 1: 8}

    asyncio.run(scenario())
