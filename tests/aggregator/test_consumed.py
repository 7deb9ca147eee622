"""Consumed batches commit with their offsets, and only in sequence: a batch that does not
start where the stored offsets end is refused whole (a failed predecessor must be re-read)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pytest

from aggregator.errors import OffsetGap
from aggregator.store import Store
from aggregator.store.consumed import ConsumedBatch, stored_offsets
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
            assert store.seq is not None
            first = ConsumedBatch("t", _events("a", "b"), {0: (0, 2)}, store.seq)
            assert await store.write(first) == 2
            gap = ConsumedBatch("t", _events("d"), {0: (3, 4)}, store.seq)
            with pytest.raises(OffsetGap):
                await store.write(gap)
            assert await store.read(stored_offsets, "t") == {0: 2}
            again = ConsumedBatch("t", _events("b", "c"), {0: (2, 4), 1: (0, 1)}, store.seq)
            assert await store.write(again) == 1  # "b" was applied before: a duplicate
            assert await store.read(stored_offsets, "t") == {0: 4, 1: 1}
            count = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()
            )
            assert count == [(3,)]

    asyncio.run(scenario())
