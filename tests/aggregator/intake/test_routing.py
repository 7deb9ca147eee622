"""Which moved records a core leaves out (`intake.routing.foreign`): those a shard of another
count moved, since its deployment routes the original rows itself; of a deployment split into
this one (`intake.splits`), the rows read past their partition's cut."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aggregator.errors import CutUnknown
from aggregator.intake.routing import _encoded, foreign
from aggregator.intake.splits import Splits
from aggregator.store import shard_splits
from ingest.kafka import Shard
from meters.columnar import H_MOVED, H_ORIGINS


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
