"""The ingest log's files: a write cut short by a crash is cut off, damage before the end is
refused, an append whose transaction failed is undone, and stored segments are deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aggregator.store import ingest_log
from aggregator.store.ingest_log import IngestLog, LogCorrupt, Logged


def _request(first: int, n: int = 3) -> Logged:
    return Logged(first, "org", 1_000_000, first, first + n - 1, [], b"events-%d" % first)


def _reopened(directory: Path, stored: int = 0) -> list[int]:
    log = IngestLog(directory)
    try:
        return [r.id for r in log.open(stored)]
    finally:
        log.close()


def test_records_after_the_stored_mark_come_back_in_order(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    assert log.open(0) == []
    log.append([_request(1), _request(4)])
    log.append([_request(7, n=2)])
    log.close()
    assert _reopened(tmp_path) == [1, 4, 7]
    assert _reopened(tmp_path, stored=4) == [7]
    back = IngestLog(tmp_path).open(0)
    assert back[2] == _request(7, n=2)  # every field, the events' bytes included


def test_a_torn_last_record_is_cut_off(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    log.open(0)
    log.append([_request(1)])
    log.append([_request(4)])
    log.close()
    (segment,) = tmp_path.glob("*.log")
    whole = segment.stat().st_size
    os.truncate(segment, whole - 3)  # the crash came mid-write
    assert _reopened(tmp_path) == [1]
    assert segment.stat().st_size < whole - 3  # cut at the last whole record
    log = IngestLog(tmp_path)
    log.open(0)
    log.append([_request(4)])  # appends follow the last whole record
    log.close()
    assert _reopened(tmp_path) == [1, 4]


def test_damage_before_the_last_segment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_log, "SEGMENT_BYTES", 1)  # a segment per append
    log = IngestLog(tmp_path)
    log.open(0)
    log.append([_request(1)])
    log.append([_request(4)])
    log.close()
    first = sorted(tmp_path.glob("*.log"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt):
        _reopened(tmp_path)


def test_an_undone_append_leaves_nothing(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    log.open(0)
    log.append([_request(1)])
    mark = log.append([_request(4)])
    log.undo(mark)
    log.append([_request(9)])
    log.close()
    assert _reopened(tmp_path) == [1, 9]


def test_stored_segments_are_deleted_but_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_log, "SEGMENT_BYTES", 1)
    log = IngestLog(tmp_path)
    log.open(0)
    for first in (1, 4, 7):
        log.append([_request(first)])
    assert len(list(tmp_path.glob("*.log"))) == 3
    log.stored(4)
    assert len(list(tmp_path.glob("*.log"))) == 1  # 1.. and 4.. gone
    log.stored(7)
    assert len(list(tmp_path.glob("*.log"))) == 1  # the one appended to stays
    log.close()
    assert _reopened(tmp_path, stored=7) == []
