"""The ingest log's files: a write cut short past what was acknowledged is cut off (and said);
acknowledged bytes that do not read back, or are missing, are refused with the file and the
byte, changing nothing; an append whose transaction failed is undone; stored segments are
deleted."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from unittest import mock

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.store.machinery import ingest_log
from aggregator.store.machinery.ingest_log import IngestLog, LogCorrupt, Logged


def _request(first: int, n: int = 3) -> Logged:
    return Logged(first, "org", 1_000_000, first, first + n - 1, [], b"events-%d" % first)


def _reopened(directory: Path, stored: int = 0, *, witnessed: bool = True) -> list[int]:
    log = IngestLog(directory)
    try:
        return [r.id for r in log.open(stored, witnessed)]
    finally:
        log.close()


def _written(directory: Path, *firsts: int) -> Path:
    """A log of one request per first seq, closed; its (last) segment."""
    log = IngestLog(directory)
    log.open(0)
    for first in firsts:
        log.append([_request(first)])
    log.close()
    return sorted(directory.glob("*.log"))[-1]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_records_after_the_stored_mark_come_back_in_order(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    assert log.open(0) == []
    log.append([_request(1), _request(4)])
    log.append([_request(7, n=2)])
    log.close()
    assert _reopened(tmp_path) == [1, 4, 7]
    assert _reopened(tmp_path, stored=4) == [7]
    back = IngestLog(tmp_path)
    assert back.open(0)[2] == _request(7, n=2)  # every field, the events' bytes included
    back.close()


def test_a_write_cut_short_past_the_acknowledged_end_is_cut_off_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = _written(tmp_path, 1, 4)
    whole = segment.stat().st_size
    with segment.open("ab") as f:  # the crash came mid-write: never acknowledged
        f.write(_request(7).encode()[:-3])
    with caplog.at_level(logging.WARNING):
        assert _reopened(tmp_path) == [1, 4]
    assert segment.stat().st_size == whole  # cut at the last whole record
    assert f"{segment}: cut at byte {whole}" in caplog.text  # said, with where
    log = IngestLog(tmp_path)
    log.open(0, witnessed=True)
    log.append([_request(7)])  # appends follow the last whole record
    log.close()
    assert _reopened(tmp_path) == [1, 4, 7]


def test_a_flipped_byte_mid_segment_is_refused_naming_the_file_and_byte(tmp_path: Path) -> None:
    segment = _written(tmp_path, 1, 4, 7)
    second = len(_request(1).encode())
    data = bytearray(segment.read_bytes())
    data[second + 20] ^= 0x01  # in the second record; a whole third follows
    segment.write_bytes(bytes(data))
    before = _files(tmp_path)
    with pytest.raises(LogCorrupt) as refused:
        _reopened(tmp_path)
    assert refused.value.damage.path == segment
    assert refused.value.damage.offset == second
    assert f"{segment} at byte {second}" in str(refused.value)
    assert _files(tmp_path) == before  # nothing cut, nothing rewritten


@pytest.mark.parametrize("record", [0, 1, 2])
def test_a_flipped_byte_in_any_acknowledged_record_is_refused_even_the_last(
    tmp_path: Path, record: int
) -> None:
    segment = _written(tmp_path, 1, 4, 7)
    size = len(_request(1).encode())
    data = bytearray(segment.read_bytes())
    data[record * size + size - 1] ^= 0x80  # the record's last byte: it looks torn
    segment.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt) as refused:
        _reopened(tmp_path)
    assert refused.value.damage.offset == record * size


@pytest.mark.parametrize("keep", ["half", "a record boundary", "nothing"])
def test_a_segment_cut_short_is_refused(tmp_path: Path, keep: str) -> None:
    segment = _written(tmp_path, 1, 4, 7, 10)
    size = {"half": segment.stat().st_size // 2, "a record boundary": 2 * len(_request(1).encode())}
    os.truncate(segment, size.get(keep, 0))
    before = _files(tmp_path)
    with pytest.raises(LogCorrupt, match="cut short"):
        _reopened(tmp_path)
    assert _files(tmp_path) == before


def test_a_log_deleted_whole_is_refused_once_it_had_a_witness(tmp_path: Path) -> None:
    directory = tmp_path / "m.duckdb.ingest"
    _written(directory, 1, 4)
    shutil.rmtree(directory)
    with pytest.raises(LogCorrupt, match="missing"):
        _reopened(directory, witnessed=True)
    assert not directory.exists()  # not made anew either
    assert _reopened(directory, witnessed=False) == []  # a new store's log


def test_a_deleted_segment_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_log, "SEGMENT_BYTES", 1)  # a segment per append
    _written(tmp_path, 1, 4, 7)
    for i, segment in enumerate(sorted(tmp_path.glob("*.log"))):
        kept = segment.read_bytes()
        segment.unlink()
        with pytest.raises(LogCorrupt, match="missing"):
            _reopened(tmp_path)
        segment.write_bytes(kept)
        assert _reopened(tmp_path) == [1, 4, 7], i


def test_damage_before_the_last_segment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_log, "SEGMENT_BYTES", 1)  # a segment per append
    _written(tmp_path, 1, 4)
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


def test_an_undone_append_is_not_witnessed(tmp_path: Path) -> None:
    """Undone (its transaction failed), then the process died: the log opens as before it."""
    log = IngestLog(tmp_path)
    log.open(0)
    log.append([_request(1)])
    log.undo(log.append([_request(4)]))
    log.close()
    assert _reopened(tmp_path) == [1]


def test_a_failed_fsync_leaves_the_log_and_its_witness_as_before(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    log.open(0)
    log.append([_request(1)])
    with (
        mock.patch.object(os, "fdatasync", side_effect=OSError(5, "I/O error")),
        pytest.raises(OSError, match="I/O error"),
    ):
        log.append([_request(4)])  # the witness's write fails
    log.close()
    assert _reopened(tmp_path) == [1]


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
    assert list(tmp_path.glob("*.sealed")) == []  # with their seals
    log.stored(7)
    assert len(list(tmp_path.glob("*.log"))) == 1  # the one appended to stays
    log.close()
    assert _reopened(tmp_path, stored=7) == []
    assert _reopened(tmp_path, stored=4) == [7]


def test_a_log_written_before_the_witness_opens_and_is_witnessed_from_then(
    tmp_path: Path,
) -> None:
    """The previous format: segments of the same frames, no `acknowledged` file, no seals."""
    segment = tmp_path / f"{1:020d}.log"
    segment.write_bytes(b"".join(previous_frame(_request(first)) for first in (1, 4, 7)))
    assert _reopened(tmp_path, witnessed=False) == [1, 4, 7]
    assert (tmp_path / ingest_log.WITNESS).exists()
    os.truncate(segment, segment.stat().st_size - 1)  # now it is witnessed: damage
    with pytest.raises(LogCorrupt):
        _reopened(tmp_path)


def test_a_log_from_before_the_witness_cuts_a_torn_tail_but_refuses_damage_before_whole_records(
    tmp_path: Path,
) -> None:
    segment = tmp_path / f"{1:020d}.log"
    frames = [previous_frame(_request(first)) for first in (1, 4, 7)]
    segment.write_bytes(b"".join(frames)[:-5])
    assert _reopened(tmp_path, witnessed=False) == [1, 4]
    data = bytearray(b"".join(frames))
    data[len(frames[0]) + 3] ^= 0x01  # the second record, the third whole after it
    segment.write_bytes(bytes(data))
    (tmp_path / ingest_log.WITNESS).unlink()
    with pytest.raises(LogCorrupt, match="followed by whole records"):
        _reopened(tmp_path, witnessed=False)


def previous_frame(record: Logged) -> bytes:
    """A record as the log wrote it before the witness (the frame is unchanged since), made
    here rather than by `Logged.encode`: what older versions left on disk."""
    header = orjson.dumps(
        [
            record.id,
            record.organization_id,
            record.ingested_at_us,
            record.first_seq,
            record.last_seq,
            record.duplicates,
        ]
    )
    crc = zlib.crc32(record.events, zlib.crc32(header))
    return (
        struct.pack("<4sIII", b"MLG1", len(header), len(record.events), crc)
        + header
        + (record.events)
    )


damages = st.tuples(
    st.sampled_from(["flip", "cut", "delete"]),
    st.integers(min_value=0, max_value=10**6),  # which file (modulo the files there are)
    st.integers(min_value=0, max_value=10**9),  # where in it (modulo its size)
    st.integers(min_value=0, max_value=7),  # which bit
)


@given(
    appends=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=6),
    segment_bytes=st.sampled_from([1, 150, ingest_log.SEGMENT_BYTES]),
    damage=damages,
)
def test_damage_anywhere_gives_back_every_acknowledged_request_or_is_refused(
    appends: list[int], segment_bytes: int, damage: tuple[str, int, int, int]
) -> None:
    """A flipped bit, a cut or a deleted file anywhere in the log's files: the log opens with
    every request it acknowledged, or refuses; it never opens with fewer."""
    kind, which, where, bit = damage
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(ingest_log, "SEGMENT_BYTES", segment_bytes),
    ):
        directory = Path(tmp)
        log = IngestLog(directory)
        log.open(0)
        acknowledged: list[int] = []
        first = 1
        for n in appends:
            batch = [_request(first + 3 * k) for k in range(n)]
            log.append(batch)
            acknowledged += [r.id for r in batch]
            first += 3 * n
        log.close()
        files = sorted(p for p in directory.iterdir() if p.is_file())
        target = files[which % len(files)]
        size = target.stat().st_size
        if kind == "delete":
            target.unlink()
        elif kind == "cut":
            os.truncate(target, where % max(size, 1))
        elif size:
            data = bytearray(target.read_bytes())
            data[where % size] ^= 1 << bit
            target.write_bytes(bytes(data))
        try:
            back = _reopened(directory)
        except LogCorrupt:
            return
        assert back == acknowledged
