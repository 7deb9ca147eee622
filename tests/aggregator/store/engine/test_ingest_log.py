"""The ingest log's files: a write cut short past what was acknowledged is cut off (and said);
acknowledged bytes that do not read back, or are missing, are refused with the file and the
byte, changing nothing; an append whose transaction failed is undone; stored segments are
deleted. A repair of damage of any kind keeps every request whose frame is whole, once and in
order, and nothing else."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import duckdb
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.store.engine import ingest_log, ingest_log_repair
from aggregator.store.engine.ingest_log import IngestLog, LogCorrupt, Logged
from aggregator.store.engine.migrations import migrate


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


def test_bad_bytes_past_the_witnessed_end_with_a_whole_record_after_them_are_damage(
    tmp_path: Path,
) -> None:
    """A witness that lost its newest copy says less was acknowledged than was: bytes that do
    not read back past where it says, with a whole record after them, are not a write cut
    short (that is the last write), so the acknowledged record after them is not cut off."""
    segment = _written(tmp_path, 1, 4, 7)
    witness = tmp_path / ingest_log.WITNESS
    os.truncate(witness, 64)  # the newest copy (the third append's) is lost; the second's stays
    two = 2 * len(_request(1).encode())
    data = segment.read_bytes()
    segment.write_bytes(data[:two] + b"junk" + data[two:])
    with pytest.raises(LogCorrupt, match="followed by whole records") as refused:
        _reopened(tmp_path)
    assert refused.value.damage.offset == two


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
    st.sampled_from(["flip", "cut", "delete", "insert"]),
    st.integers(min_value=0, max_value=10**6),  # which file (modulo the files there are)
    st.integers(min_value=0, max_value=10**9),  # where in it (modulo its size)
    st.integers(min_value=0, max_value=7),  # which bit
    st.binary(min_size=1, max_size=64),  # the junk inserted
)


def damage_log(directory: Path, damage: tuple[str, int, int, int, bytes]) -> None:
    """A flipped bit, a cut, a deleted file or junk inserted, in any of the log's files."""
    kind, which, where, bit, junk = damage
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if not files:
        return
    target = files[which % len(files)]
    data = bytearray(target.read_bytes())
    if kind == "delete":
        target.unlink()
    elif kind == "cut":
        os.truncate(target, where % max(len(data), 1))
    elif kind == "insert":
        at = where % (len(data) + 1)
        target.write_bytes(bytes(data[:at] + junk + data[at:]))
    elif data:
        data[where % len(data)] ^= 1 << bit
        target.write_bytes(bytes(data))


def _logged(appends: list[int], directory: Path, stored: int = 0) -> tuple[list[Logged], int]:
    """A log of `appends` (that many requests each), closed, of which the first `stored`
    requests (or all there are) are stored, their segments deleted as the flusher does; its
    requests, and the id of the last one stored (0: none)."""
    log = IngestLog(directory)
    log.open(0)
    requests: list[Logged] = []
    for n in appends:
        batch = [_request(3 * len(requests) + 1 + 3 * k) for k in range(n)]
        log.append(batch)
        requests += batch
    stored = min(stored, len(requests))
    through = requests[stored - 1].id if stored else 0
    log.stored(through)
    log.close()
    return requests, through


@given(
    appends=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=6),
    segment_bytes=st.sampled_from([1, 150, ingest_log.SEGMENT_BYTES]),
    damage=damages,
)
def test_damage_anywhere_gives_back_every_acknowledged_request_or_is_refused(
    appends: list[int], segment_bytes: int, damage: tuple[str, int, int, int, bytes]
) -> None:
    """A flipped bit, a cut, a deleted file or junk inserted anywhere in the log's files: the
    log opens with every request it acknowledged, or refuses; it never opens with fewer."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(ingest_log, "SEGMENT_BYTES", segment_bytes),
    ):
        directory = Path(tmp)
        acknowledged = [r.id for r in _logged(appends, directory)[0]]
        damage_log(directory, damage)
        try:
            back = _reopened(directory)
        except LogCorrupt:
            return
        assert back == acknowledged


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """A database as a store leaves it (every schema step, a witnessed log), with no events and
    the requests through a given id stored: where repair reads its stored mark. Made once per
    id, then copied."""
    folder = tmp_path_factory.mktemp("stores")
    made: dict[int, Path] = {}

    def store(through: int) -> Path:
        if through not in made:
            path = folder / f"{through}.duckdb"
            con = duckdb.connect(str(path))
            migrate(con)
            ingest_log.mark_stored(con, through)
            ingest_log.mark_witnessed(con)
            con.close()
            made[through] = path
        return made[through]

    return store


@pytest.mark.slow
@given(
    appends=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=6),
    stored=st.integers(min_value=0, max_value=18),
    segment_bytes=st.sampled_from([1, 150, 400, ingest_log.SEGMENT_BYTES]),
    damage=st.lists(damages, min_size=1, max_size=3),
)
def test_a_repair_keeps_every_request_whose_frame_is_intact_once_in_order_and_nothing_else(
    stores: Callable[[int], Path],
    appends: list[int],
    stored: int,
    segment_bytes: int,
    damage: list[tuple[str, int, int, int, bytes]],
) -> None:
    """Damage of any kind, in any number of places: the repair keeps each request whose frame
    is still whole in its segment (junk beside it or not), once and in order, and nothing else,
    moves the rest aside (nothing deleted), and the log then opens with them. What it keeps is
    what `check` says beforehand."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(ingest_log, "SEGMENT_BYTES", segment_bytes),
    ):
        database = Path(tmp) / "m.duckdb"
        directory = ingest_log_repair.log_directory(database)
        requests, through = _logged(appends, directory, stored)
        shutil.copy(stores(through), database)
        for one in damage:
            damage_log(directory, one)
        damaged = {p.name: p.read_bytes() for p in directory.glob("*.log")}
        segments = sorted(int(name.removesuffix(".log")) for name in damaged)
        intact = []
        for request in requests:
            # Its segment: the last one named at or before it (named by its first request).
            holder = max((s for s in segments if s <= request.id), default=None)
            if holder is not None and request.encode() in damaged[f"{holder:020d}.log"]:
                intact.append(request.id)
        kept = [i for i in intact if i > through]
        before = _files_under(directory)

        checked, aside = ingest_log_repair.repair(database)
        assert checked.pending == len(kept)  # as `check` says beforehand
        assert _reopened(directory, through) == kept
        if aside is None:
            return
        # Nothing deleted: every file is where it was, or aside as it was.
        after = _files_under(directory)
        for name, data in before.items():
            aside_copy = after.get(f"{aside.relative_to(directory)}/{name}")
            assert after.get(name) == data or aside_copy == data, name


def _files_under(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }
