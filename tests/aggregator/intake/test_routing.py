"""Which moved records a core leaves out (`intake.routing.foreign`): those a shard of another
count moved, since its deployment routes the original rows itself; of a deployment split into
this one (`intake.splits`), the rows read past their partition's cut."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.errors import CutUnknown
from aggregator.intake.decode import decode_batch
from aggregator.intake.routing import Placement, Router, _encoded, foreign
from aggregator.intake.splits import Splits
from aggregator.store import shard_splits
from ingest.kafka import KafkaSettings, Shard
from meters.columnar import H_MOVED, H_ORIGINS, records_for
from meters.events.schema import COLUMNS
from meters.settings import EventRules


def _record(*headers: tuple[str, bytes]) -> Any:
    return type("Record", (), {"headers": headers})()


def _unsplit(mover: Shard, origins: Any) -> None:
    return None


def test_records_moved_by_another_shard_count_are_left_out() -> None:
    records = [
        _record(),  # as an edge wrote it
        _record(("meterline.format", b"arrow-ipc"), (H_MOVED, b"1/2")),  # by a shard of 2
        _record((H_MOVED, b"0/3")),  # by a shard of 3
        _record((H_MOVED, b"garbage")),  # not meterline's mark
    ]
    assert foreign(records, Shard(0, 2), _unsplit) == [(2, None)]
    assert foreign(records, Shard(2, 3), _unsplit) == [(1, None)]
    # One shard moves nothing: every move is a copy.
    assert foreign(records, Shard(), _unsplit) == [(1, None), (2, None)]


def _splits(shard: Shard, *known: shard_splits.Split) -> Splits:
    async def read_now(read: Any) -> list[shard_splits.Split]:
        return list(known)

    splits = Splits(shard)
    asyncio.run(splits.load(type("Store", (), {"read_now": staticmethod(read_now)})()))
    return splits


def test_a_split_into_this_deployment_keeps_the_rows_read_before_their_cut() -> None:
    # Rows first read at partition 3 offsets 9 and 10, and partition 5 offset 2; 3 was cut at
    # 10 (offset 9 was applied by its old shard, which moved the row; 10 was not) and 5 at 7.
    origins = _encoded([(3, 9, 0), (3, 10, 1), (5, 2, 0)])
    moved = _record((H_MOVED, b"1/2"), (H_ORIGINS, origins))
    split = shard_splits.Split(2, 4, 8, {3: 10, 5: 7}, origin=True)
    made_here = _splits(Shard(1, 4), split)
    assert foreign([moved], Shard(1, 4), made_here.moved_rows) == [(0, 1)]
    # A deployment of four that the split did not make routes every row itself.
    elsewhere = _splits(Shard(1, 4), shard_splits.Split(2, 4, 8, {3: 10, 5: 7}, False))
    assert foreign([moved], Shard(1, 4), elsewhere.moved_rows) == [(0, None)]
    # A cut not known yet: read again later.
    unknown = _splits(Shard(1, 4), shard_splits.Split(2, 4, 8, {3: 10}, origin=True))
    with pytest.raises(CutUnknown):
        foreign([moved], Shard(1, 4), unknown.moved_rows)


ORGANIZATIONS = ("0b8f6f4e-8f6e-4d57-9a43-1f1f7c2b6d01", "5d3c2b1a-0f9e-4d8c-b7a6-958473625140")
CUSTOMERS = tuple(str(uuid.UUID(int=i, version=4)) for i in range(1, 7))
AT_US = 1_700_000_000_000_000


class _Keys:
    """A store whose customers route by their own name (`customer_tables.routing_keys`)."""

    async def read_now(self, read: Any, refs: list[Any]) -> dict[Any, str]:
        return {ref: f"key:{ref[1]}" for ref in refs}


def _consumed(batches: list[tuple[int, int, list[str]]]) -> tuple[Any, list[Any]]:
    """Records (organization, ingest second, customers of its rows) as a consumer reads them,
    and the table it decodes from them."""
    records = []
    for offset, (org, second, customers) in enumerate(batches):
        columns: dict[str, list[Any]] = {name: [None] * len(customers) for name in COLUMNS.names}
        columns["name"] = ["use"] * len(customers)
        columns["timestamp"] = [AT_US] * len(customers)
        columns["customer_id"] = list(customers)
        columns["metadata"] = [f'{{"n": {i}}}' for i in range(len(customers))]
        events = pa.table(columns, schema=COLUMNS)
        (made,) = records_for(events, ORGANIZATIONS[org], AT_US + second, 0, "none", 1 << 20)
        records.append(
            ConsumerRecord(
                "t",
                offset % 4,
                offset,
                AT_US // 1000,
                0,
                None,
                made.value,
                None,
                0,
                0,
                list(made.headers),
            )
        )
    values = [r.value for r in records]
    table, dead = decode_batch(
        values,
        [r.timestamp for r in records],
        [list(r.headers) for r in records],
        AT_US,
        EventRules(max_future=timedelta(days=1)),
        1 << 26,
    )
    assert not dead
    return table, records


@given(
    st.lists(
        st.tuples(
            st.integers(0, 1),
            st.integers(0, 3),
            st.lists(st.sampled_from(CUSTOMERS), min_size=1, max_size=12),
        ),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=60, deadline=None)
def test_split_keeps_owned_rows_and_moves_each_other_row_once_with_its_group(
    batches: list[tuple[int, int, list[str]]],
) -> None:
    """`Router.split`, step 1: every row is kept or moved, once; a moved row is in the group of
    its organization, ingest time and partition, in the order it was read, with its origin."""
    table, records = _consumed(batches)
    shard = Shard(0, 2)
    router = Router(_Keys(), KafkaSettings("unused:9092", shard=shard), 4)  # type: ignore[arg-type]
    kept, moved, where = asyncio.run(router.split(table, records))

    placement = Placement(shard, 4)
    rows = table.to_pylist()
    ingested = table.column("ingested_at").cast(pa.int64()).to_pylist()
    targets = [placement.partition(r["organization_id"], f"key:{r['customer_id']}") for r in rows]
    owned = [shard.owns(t) for t in targets]
    plain = [{name: r[name] for name in COLUMNS.names} for r in rows]
    if all(owned):
        assert (kept, moved, where) == (table, [], [])
        return
    assert kept.select(COLUMNS.names).to_pylist() == [
        e for e, o in zip(plain, owned, strict=True) if o
    ]
    away = [i for i, o in enumerate(owned) if not o]
    read = [records[rows[i]["position"]] for i in away]
    origin = [(r.partition, r.offset, rows[i]["row"]) for r, i in zip(read, away, strict=True)]
    assert where == origin
    first = dict(zip(away, [(p, o, row or 0) for p, o, row in origin], strict=True))
    expected: dict[tuple[str, int, int], list[int]] = {}
    for i in away:
        key = (rows[i]["organization_id"], ingested[i], targets[i])
        expected.setdefault(key, []).append(i)
    assert {(m.organization_id, m.ingested_at_us, m.partition) for m in moved} == set(expected)
    for m in moved:
        which = expected[(m.organization_id, m.ingested_at_us, m.partition)]
        assert m.events.to_pylist() == [plain[i] for i in which]
        assert m.origins == [first[i] for i in which]
