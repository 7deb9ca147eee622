"""Consumed batches commit with their offsets, and only in sequence: a batch that does not
start where the stored offsets end is refused whole (a failed predecessor must be re-read).
A row another shard moved here twice is applied once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.errors import OffsetGap
from aggregator.store import ORIGIN, Store
from aggregator.store.apply.consumed import ConsumedBatch, StartOffsets, stored_offsets
from meters.events import Event, to_table
from meters.times import now_us
from tests.strategies import examples

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


def _moved(origins: list[tuple[int, int, int]], external_ids: list[str | None]) -> pa.Table:
    """Rows another shard moved here: each with where it was first read (`ids.ORIGIN`)."""
    table = _events(*[e or "" for e in external_ids])
    table = table.set_column(
        table.column_names.index("external_id"), "external_id", pa.array(external_ids, pa.string())
    )
    for column, values in zip(
        ORIGIN, [*zip(*origins, strict=True), [True] * len(origins)], strict=True
    ):
        table = table.append_column(column, pa.array(values, column.type))
    return table


@settings(max_examples=examples(25))
@given(
    steps=st.lists(
        st.tuples(
            st.lists(
                st.tuples(st.integers(0, 5), st.sampled_from([None, None, "k1", "k2"])),
                min_size=1,
                max_size=6,
            ),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_row_moved_twice_is_applied_once(tmp_path_factory: Any, steps: Any) -> None:
    """A shard that crashed after moving rows and before committing their batch moves them
    again: the copies carry the same origin, and only the first is applied, with or without
    an external id, whether the first is still in memory, stored, or loaded at a restart
    (`reopen`). Rows with an external id keep their own key (first write wins)."""
    path = tmp_path_factory.mktemp("moved") / "c.duckdb"
    expected_origins: set[int] = set()
    expected_keys: set[str] = set()
    expected = 0

    async def scenario() -> None:
        nonlocal expected
        offset = 0
        store = Store(path, flush_events=1, flush_seconds=0.01)
        await store.__aenter__()
        try:
            for rows, reopen in steps:
                origins = [(1, 100 + n, 0) for n, _ in rows]
                externals = [e for _, e in rows]
                batch = _moved(origins, externals)
                new = 0
                for n, external in rows:
                    if external is not None:
                        new += external not in expected_keys
                        expected_keys.add(external)
                    else:
                        new += n not in expected_origins
                        expected_origins.add(n)
                job = ConsumedBatch("t", batch, {0: (offset, offset + 1)}, now_us())
                assert await store.write(job) == new
                expected += new
                offset += 1
                if reopen:
                    await store.__aexit__(None, None, None)
                    store = Store(path, flush_events=1, flush_seconds=0.01)
                    await store.__aenter__()
            count = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()
            )
            assert count == [(expected,)]
        finally:
            await store.__aexit__(None, None, None)

    asyncio.run(scenario())
