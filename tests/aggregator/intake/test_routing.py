"""Which moved records a core leaves out (`intake.routing.foreign`): those a shard of another
count moved, since its deployment routes the original rows itself."""

from __future__ import annotations

from typing import Any

from aggregator.intake.routing import foreign
from ingest.kafka import Shard
from meters.columnar import H_MOVED


def _record(*headers: tuple[str, bytes]) -> Any:
    return type("Record", (), {"headers": headers})()


def test_records_moved_by_another_shard_count_are_left_out() -> None:
    records = [
        _record(),  # as an edge wrote it
        _record(("meterline.format", b"arrow-ipc"), (H_MOVED, b"1/2")),  # by a shard of 2
        _record((H_MOVED, b"0/3")),  # by a shard of 3
        _record((H_MOVED, b"garbage")),  # not meterline's mark
    ]
    assert foreign(records, Shard(0, 2)) == [2]
    assert foreign(records, Shard(2, 3)) == [1]
    assert foreign(records, Shard()) == [1, 2]  # one shard moves nothing: every move is a copy
