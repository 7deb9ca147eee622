"""The ingest log: what makes an embedded ingest request durable before its events are stored.

Embedded mode has no Kafka to replay from, and a request is answered only once it is durable
(docs/internals/decisions.md, decision 1). Storing its events in a transaction of their own would
cost their full size in DuckDB's WAL and again at the next checkpoint, and a commit that writes
anything waits for a running checkpoint. So each accepted request is appended instead to files
beside the database (`<database>.ingest/`, one segment after another), fsynced before the request is
answered: its events as the validator gave them (Arrow IPC, zstd: ~50 bytes an event), which of them
were duplicates, and the seqs the others took. The flush that stores the events records, in its own
transaction, the last request they complete (`ingest_stored`); segments wholly before it are
deleted. At open, what the log holds after that mark is applied again exactly as it was.

A record is framed (magic, lengths, CRC-32), but a frame alone cannot tell a write a crash cut
short (never answered) from acknowledged bytes lost since: a cut file, a flipped byte in the
last record. So what was acknowledged is witnessed apart from the segments, in the
`acknowledged` file (`Mark`): after each append's fsync, and before the request is answered,
where the log then ends and its last request are written there and fdatasynced. (Recording it
in DuckDB's commit instead would make every ingest commit write DuckDB's WAL and wait for its
checkpoints, which is what the log avoids.) A segment left for the next one is sealed with its
size (`<segment>.sealed`). At open:

- bytes past the witnessed end that do not read back, and no whole record after them, are a
  write cut short: cut off, and said;
- a record before it that does not read back (or past it, followed by whole records: a write
  cut short is the last), a segment shorter than witnessed or sealed, or a segment the witness
  counts that is missing, is damage: `LogCorrupt` names the file and the byte, and nothing is
  changed (`meterline ingest-log check|repair` says what is lost, keeps every whole record and
  moves the rest aside);
- the store records that its log has a witness (`ingest_stored.witnessed`), so a log deleted
  whole is missing, not new. A log written before the witness existed is opened by the frames
  alone once, and witnessed from then.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import AggregatorError
from meters.events.schema import TIMESTAMP
from meters.ipc import Encoded, read_ipc

log = logging.getLogger(__name__)

_MAGIC = b"MLG1"
_FRAME = struct.Struct("<4sIII")  # magic, header bytes, events bytes, CRC-32 of both
SEGMENT_BYTES = 64 * 1024 * 1024  # a new segment once the current one is this large
WITNESS = "acknowledged"  # the file beside the segments that witnesses the acknowledged end
_WITNESS = struct.Struct("<4sQqqqqqqI")  # magic, counter, a `Mark`'s fields, CRC-32 of the rest
_WITNESS_MAGIC = b"MLA1"
_WITNESS_SLOTS = (0, 512)  # two copies in different sectors: a torn write leaves the other
_SEAL = struct.Struct("<4sqI")  # magic, the segment's size, CRC-32 of both
_SEAL_MAGIC = b"MLS1"


@dataclass(frozen=True, slots=True)
class Damage:
    """Acknowledged requests that do not read back: `path` at byte `offset`, and why
    (`missing`: a file is)."""

    path: Path
    offset: int
    what: str
    missing: bool = False


class LogCorrupt(AggregatorError):
    """The ingest log cannot give back every request it acknowledged: it is not opened, and
    nothing is changed."""

    def __init__(self, damage: Damage) -> None:
        super().__init__(
            f"the ingest log is damaged: {damage.path} at byte {damage.offset}: {damage.what};"
            " nothing was changed"
        )
        self.damage = damage


@dataclass(frozen=True, slots=True)
class Mark:
    """How far the log was acknowledged: `segments` segment files from the one named `oldest`
    to the one named `segment` (a segment is named by its first request's id), `end` bytes of
    that last one, and the last request, `last_id`, whose last seq is `last_seq` (0: none)."""

    oldest: int
    segments: int
    segment: int
    end: int
    last_id: int
    last_seq: int


NO_MARK = Mark(0, 0, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Logged:
    """One accepted request: `events` (IPC, as validated), the rows of it that were
    duplicates, and the seqs `first_seq`.. that the others took, in order. `id` is its
    first seq."""

    id: int
    organization_id: str
    ingested_at_us: int
    first_seq: int
    last_seq: int
    duplicates: list[int]
    events: bytes

    def applied(self) -> pa.Table:
        """The new events as `Applied.events` holds them."""
        table = read_ipc(self.events)
        if self.duplicates:
            dropped = pa.array(self.duplicates, pa.int64())
            rows = pa.array(range(table.num_rows), pa.int64())
            table = table.filter(pc.invert(pc.is_in(rows, value_set=dropped)))
        return with_origin(table, self.organization_id, self.ingested_at_us).append_column(
            "seq", pa.array(range(self.first_seq, self.last_seq + 1), pa.int64())
        )

    def encode(self) -> bytes:
        header = orjson.dumps(
            [
                self.id,
                self.organization_id,
                self.ingested_at_us,
                self.first_seq,
                self.last_seq,
                self.duplicates,
            ]
        )
        crc = zlib.crc32(self.events, zlib.crc32(header))
        return _FRAME.pack(_MAGIC, len(header), len(self.events), crc) + header + self.events


def with_origin(events: pa.Table, organization_id: str, ingested_at_us: int) -> pa.Table:
    """`events` (`meters.events.COLUMNS`) with their organization, ingest time and source."""
    n = events.num_rows
    table = events.append_column("organization_id", pa.array([organization_id] * n, pa.string()))
    table = table.append_column("ingested_at", pa.array([ingested_at_us] * n, TIMESTAMP))
    return with_source(table)


def with_source(events: pa.Table) -> pa.Table:
    """User events' `source` (what meters may filter on)."""
    return events.append_column("source", pa.array(["user"] * events.num_rows, pa.string()))


def encode(events: pa.Table) -> bytes:
    """How the log keeps a request's events: what the edge's validation encodes for the
    embedded publisher (`meters.ipc.Encoded`)."""
    return Encoded(events).data


def stored_through(con: duckdb.DuckDBPyConnection) -> int:
    """The id of the last logged request whose events are stored."""
    return stored_marks(con)[0]


def stored_marks(con: duckdb.DuckDBPyConnection) -> tuple[int, bool]:
    """What the store records of its log: the last logged request whose events are stored,
    and whether the log has a witness (a database from before either has neither)."""
    columns = {
        str(name)
        for (name,) in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'ingest_stored'"
        ).fetchall()
    }
    if not columns:
        return 0, False
    if "witnessed" not in columns:  # migration step 20 not run yet
        return int(con.execute("SELECT through FROM ingest_stored").fetchall()[0][0]), False
    row = con.execute("SELECT through, witnessed FROM ingest_stored").fetchall()[0]
    return int(row[0]), bool(row[1])


def mark_stored(con: duckdb.DuckDBPyConnection, through: int) -> None:
    """Record, in the flush's transaction, that requests up to `through` are stored."""
    con.execute("UPDATE ingest_stored SET through = greatest(through, ?)", [through])


def mark_witnessed(con: duckdb.DuckDBPyConnection) -> None:
    """Record that the log has a witness: from now on, a log without one is missing."""
    con.execute("UPDATE ingest_stored SET witnessed = true")


@dataclass(slots=True)
class Segment:
    """A segment file as found: the whole `records` it holds, filling its first `good` bytes
    of `size`; one wholly `stored` (a later segment starts after the stored mark) is not read."""

    path: Path
    first: int
    size: int
    records: list[Logged]
    good: int
    stored: bool

    @property
    def last_id(self) -> int:
        return self.records[-1].id if self.records else -1


@dataclass(slots=True)
class Survey:
    """What a log holds, found without changing anything: its segments, what its witness says
    (None: there is none), the damage that keeps it from opening, if any, and else where a
    write cut short ends the last segment (`cut` bytes kept), if one did."""

    directory: Path
    segments: list[Segment]
    mark: Mark | None
    damage: Damage | None
    cut: int | None

    def pending(self, stored: int) -> list[Logged]:
        """The requests after `stored`, in order."""
        return [r for s in self.segments for r in s.records if r.id > stored]


def survey(directory: Path, stored: int, witnessed: bool) -> Survey:
    """Read the log in `directory` of a store whose requests through `stored` are stored, and
    whose log has had a witness if `witnessed`."""
    paths = sorted(directory.glob("*.log")) if directory.is_dir() else []
    segments: list[Segment] = []
    for i, path in enumerate(paths):
        size = path.stat().st_size
        later = int(paths[i + 1].stem) if i + 1 < len(paths) else None
        if later is not None and later <= stored + 1:  # only requests <= stored in it
            segments.append(Segment(path, int(path.stem), size, [], size, stored=True))
            continue
        records, good = read_frames(path.read_bytes())
        segments.append(Segment(path, int(path.stem), size, records, good, stored=False))
    found = Survey(directory, segments, None, None, None)
    witness = directory / WITNESS
    read = read_witness(witness)
    if read is not None:
        found.mark = read[1]
        found.damage, found.cut = _against_mark(found, read[1], stored)
        return found
    found.damage, found.cut = _by_frames(found, stored)
    if witness.exists():
        found.damage = Damage(witness, 0, "neither copy of the acknowledged end reads back")
    elif witnessed and found.damage is None:
        where = witness if directory.is_dir() else directory
        found.damage = Damage(
            where,
            0,
            "missing: the log had a witness of how far it was acknowledged, so acknowledged"
            " requests may be lost with it",
            missing=True,
        )
    return found


def _against_mark(found: Survey, mark: Mark, stored: int) -> tuple[Damage | None, int | None]:
    segments = found.segments
    if mark.last_id > stored:  # acknowledged requests not yet stored: their segments must be here
        firsts = [s.first for s in segments]
        if mark.segment not in firsts:
            name = found.directory / f"{mark.segment:020d}.log"
            what = f"missing: it held acknowledged requests through {mark.last_id}"
            return Damage(name, 0, what, missing=True), None
        counted = sum(1 for f in firsts if mark.oldest <= f <= mark.segment)
        if counted < mark.segments:
            what = (
                f"{mark.segments - counted} of the {mark.segments} segments holding acknowledged"
                f" requests (from {mark.oldest:020d}.log) are missing"
            )
            return Damage(found.directory, 0, what, missing=True), None
    for i, segment in enumerate(segments):
        if segment.stored:
            continue
        if segment.first < mark.segment:
            acknowledged = 0  # whole, as sealed: checked below
        elif segment.first == mark.segment:
            acknowledged = mark.end
        else:
            acknowledged = 0  # appended after the last acknowledged append
        damage, cut = _check(found, i, acknowledged)
        if damage is not None or cut is not None:
            return damage, cut
    return None, None


def _by_frames(found: Survey, stored: int) -> tuple[Damage | None, int | None]:
    """A log without a witness (written before it existed): the frames alone."""
    segments = found.segments
    for i, segment in enumerate(segments):
        if segment.stored:
            continue
        damage, cut = _check(found, i, 0)
        if damage is not None or cut is not None:
            return damage, cut
    if stored > 0 and not segments:
        what = (
            f"missing: the store has stored the requests through {stored} from it, so it held"
            " the requests acknowledged since"
        )
        return Damage(found.directory, 0, what, missing=True), None
    return None, None


def _check(found: Survey, i: int, acknowledged: int) -> tuple[Damage | None, int | None]:
    """Segment `i`, whose first `acknowledged` bytes were acknowledged (at least: a sealed or
    a non-last segment must read back whole)."""
    segment = found.segments[i]
    last = i == len(found.segments) - 1
    seal = read_seal(segment.path)
    if seal is not None and seal < 0:
        what = "its seal (the size it was left at) does not read back"
        return Damage(seal_path(segment.path), 0, what), None
    if seal is not None:
        acknowledged = max(acknowledged, seal)
    if segment.good < segment.size:
        if segment.good < acknowledged:
            what = f"a record that does not read back ({acknowledged} bytes were acknowledged)"
            if segment.size < acknowledged:
                what = (
                    f"cut short: it ends at byte {segment.size}, {acknowledged} were acknowledged"
                )
            return Damage(segment.path, segment.good, what), None
        if not last:
            what = "a record that does not read back, with later segments after it"
            return Damage(segment.path, segment.good, what), None
        # A write cut short is the last: whole records after it were written later.
        later = resync(segment.path.read_bytes(), segment.good)
        if later is not None:
            what = (
                f"a record that does not read back, followed by whole records (from byte"
                f" {later}): damage, not a write cut short"
            )
            return Damage(segment.path, segment.good, what), None
        return None, segment.good
    if segment.size < acknowledged:
        what = f"cut short: it ends at byte {segment.size}, {acknowledged} were acknowledged"
        return Damage(segment.path, segment.size, what), None
    return None, None


def mark_of(segments: list[tuple[Path, int]], end: int, last: tuple[int, int]) -> Mark:
    """The mark of a log of `segments` (oldest first) whose last one is `end` bytes long and
    whose last request (id, last seq) is `last`."""
    if not segments:
        return Mark(0, 0, 0, 0, *last)
    firsts = [int(path.stem) for path, _ in segments]
    return Mark(firsts[0], len(firsts), firsts[-1], end, *last)


class IngestLog:
    """The segments of one database. `append` is called by the writer thread (at a commit),
    `stored` by the flusher; `directory` None keeps nothing (a database in memory)."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._segments: list[tuple[Path, int]] = []  # (path, last id in it), oldest first
        self._file: int | None = None  # the last segment, open for appending
        self._size = 0
        self._witness: Witness | None = None
        self._last = (0, 0)  # the last request appended: its id and last seq
        self._before: tuple[Mark, tuple[int, int]] | None = None  # what `undo` goes back to

    @property
    def witnessed(self) -> bool:
        """Whether the log has a witness (once opened, a log in files has)."""
        return self._witness is not None

    def open(self, stored: int, witnessed: bool = False) -> list[Logged]:
        """Read every segment; return the requests after `stored`, in order. `witnessed`: the
        store has known this log with a witness (so a log without one is missing). Raises
        `LogCorrupt`, changing nothing, if acknowledged requests do not read back."""
        if self._directory is None:
            return []
        found = survey(self._directory, stored, witnessed)
        if found.damage is not None:
            raise LogCorrupt(found.damage)
        self._directory.mkdir(parents=True, exist_ok=True)
        if found.cut is not None:
            path = found.segments[-1].path
            log.warning(
                "ingest log: %s: cut at byte %d, %d bytes of a write a crash cut short (past"
                " what was acknowledged)",
                path,
                found.cut,
                found.segments[-1].size - found.cut,
            )
            os.truncate(path, found.cut)
            found.segments[-1].size = found.cut
        last = max(((r.id, r.last_seq) for s in found.segments for r in s.records), default=None)
        if found.mark is not None:
            last = max(last or (0, 0), (found.mark.last_id, found.mark.last_seq))
        self._last = last or (0, 0)
        for s in found.segments:
            # A wholly stored segment (not read) is deleted at the next flush.
            self._segments.append((s.path, s.first - 1 if s.stored else s.last_id))
        if self._segments:
            path = self._segments[-1][0]
            self._file = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.fsync(self._file)  # the cut, if any
            self._size = path.stat().st_size
        self._witness = Witness.open(
            self._directory / WITNESS, mark_of(self._segments, self._size, self._last)
        )
        return found.pending(stored)

    def append(self, records: list[Logged]) -> tuple[int, int, int]:
        """Append and fsync, then witness the new end; returns where the log ended before (for
        `undo`). On failure the log is cut back to that point, and the error raised."""
        if self._directory is None or not records:
            return (-1, 0, -1)
        with self._lock:
            if self._file is None or self._size >= SEGMENT_BYTES:
                self._rotate(records[0].id)
            assert self._file is not None and self._witness is not None
            mark = (len(self._segments) - 1, self._size, self._segments[-1][1])
            before = (self._witness.mark, self._last)
            data = b"".join(r.encode() for r in records)
            last = (records[-1].id, records[-1].last_seq)
            try:
                write_all(self._file, data)
                os.fsync(self._file)
                # The witness after the bytes it witnesses are durable, before the answer.
                self._witness.write(mark_of(self._segments, self._size + len(data), last))
            except BaseException:
                self._cut_back(mark[1], before[0])
                raise
            self._size += len(data)
            self._last = last
            self._before = before
            path, _ = self._segments[-1]
            self._segments[-1] = (path, records[-1].id)
            return mark

    def undo(self, mark: tuple[int, int, int]) -> None:
        """Cut the log back to `mark` (the records appended since were not committed)."""
        index, size, last = mark
        if self._directory is None or index < 0:
            return
        with self._lock:
            assert self._file is not None and index == len(self._segments) - 1
            assert self._before is not None
            witnessed, self._last = self._before
            self._cut_back(size, witnessed)
            self._size = size
            self._segments[-1] = (self._segments[-1][0], last)

    def _cut_back(self, size: int, witnessed: Mark) -> None:
        """The witness back first (so that it never names bytes that are gone), then the
        segment."""
        assert self._file is not None and self._witness is not None
        try:
            self._witness.write(witnessed)  # even if unchanged: a failed write may have landed
        finally:
            os.ftruncate(self._file, size)
            os.fsync(self._file)

    def stored(self, through: int) -> None:
        """Requests up to `through` are stored: delete the segments that hold only those
        (the one being appended to stays). The witness stops counting them first."""
        with self._lock:
            doomed: list[tuple[Path, int]] = []
            while len(self._segments) > 1 and self._segments[0][1] <= through:
                doomed.append(self._segments.pop(0))
            if not doomed:
                return
            if self._witness is not None:
                witnessed = self._witness.mark
                firsts = [int(path.stem) for path, _ in self._segments]
                self._witness.write(
                    replace(
                        witnessed,
                        oldest=firsts[0],
                        segments=sum(1 for f in firsts if f <= witnessed.segment),
                    )
                )
            for path, _ in doomed:
                path.unlink(missing_ok=True)
                seal_path(path).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None
            if self._witness is not None:
                self._witness.close()

    def _rotate(self, first_id: int) -> None:
        assert self._directory is not None
        if self._file is not None:
            write_seal(self._segments[-1][0], self._size)
            os.close(self._file)
        path = self._directory / f"{first_id:020d}.log"
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._segments.append((path, -1))
        fsync_directory(self._directory)  # the new segment's name, and the seal's


class Witness:
    """The `acknowledged` file: a `Mark` in two slots written in turn (a write torn by a crash
    leaves the other), each fdatasynced before the append it witnesses is answered."""

    def __init__(self, fd: int, counter: int, mark: Mark) -> None:
        self._fd = fd
        self._counter = counter
        self.mark = mark

    @classmethod
    def open(cls, path: Path, mark: Mark) -> Witness:
        """The witness at `path`, saying `mark` (made if there is none)."""
        found = read_witness(path)
        if found is None:
            new = path.with_name(path.name + ".new")
            fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, _encode_witness(0, mark), _WITNESS_SLOTS[0])
                write_all(fd, _encode_witness(0, mark), _WITNESS_SLOTS[1])
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.replace(new, path)
            fsync_directory(path.parent)
            return cls(fd, 0, mark)
        witness = cls(os.open(path, os.O_RDWR), found[0], found[1])
        if found[1] != mark:
            witness.write(mark)
        return witness

    def write(self, mark: Mark) -> None:
        # Counted first: a write that failed halfway is overwritten by the next, in the other
        # slot with a higher count.
        self._counter += 1
        write_all(self._fd, _encode_witness(self._counter, mark), _WITNESS_SLOTS[self._counter % 2])
        os.fdatasync(self._fd)
        self.mark = mark

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _encode_witness(counter: int, mark: Mark) -> bytes:
    fields = (
        _WITNESS_MAGIC,
        counter,
        mark.oldest,
        mark.segments,
        mark.segment,
        mark.end,
        mark.last_id,
        mark.last_seq,
    )
    body = _WITNESS.pack(*fields, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def read_witness(path: Path) -> tuple[int, Mark] | None:
    """The newest copy of the mark that reads back, with its counter; None if none does (or
    there is no file: tell by `path.exists()`)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    found: list[tuple[int, Mark]] = []
    for at in _WITNESS_SLOTS:
        slot = data[at : at + _WITNESS.size]
        if len(slot) < _WITNESS.size:
            continue
        magic, counter, *fields, crc = _WITNESS.unpack(slot)
        if magic == _WITNESS_MAGIC and zlib.crc32(slot[:-4]) == crc:
            found.append((counter, Mark(*fields)))
    return max(found, key=lambda f: f[0], default=None)


def seal_path(segment: Path) -> Path:
    return segment.with_suffix(".sealed")


def write_seal(segment: Path, size: int) -> None:
    """Seal `segment` at `size` bytes, once the log moves on to the next (the caller fsyncs the
    directory)."""
    body = struct.pack("<4sq", _SEAL_MAGIC, size)
    new = segment.with_suffix(".sealed.new")
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, body + struct.pack("<I", zlib.crc32(body)))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(new, seal_path(segment))


def read_seal(segment: Path) -> int | None:
    """The size `segment` was sealed at; None if it was not, -1 if its seal does not read."""
    try:
        data = seal_path(segment).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != _SEAL.size:
        return -1
    magic, size, crc = _SEAL.unpack(data)
    if magic != _SEAL_MAGIC or zlib.crc32(data[:-4]) != crc:
        return -1
    return int(size)


def frame_at(data: bytes, at: int) -> tuple[Logged, int] | None:
    """The whole record at byte `at` of `data` and where it ends, if one is there."""
    if at + _FRAME.size > len(data):
        return None
    magic, header_bytes, event_bytes, crc = _FRAME.unpack_from(data, at)
    start = at + _FRAME.size
    end = start + header_bytes + event_bytes
    if magic != _MAGIC or end > len(data):
        return None
    header, events = data[start : start + header_bytes], data[start + header_bytes : end]
    if zlib.crc32(events, zlib.crc32(header)) != crc:
        return None
    try:
        record_id, org, at_us, first, last, duplicates = orjson.loads(header)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return Logged(record_id, org, at_us, first, last, duplicates, events), end


def read_frames(data: bytes) -> tuple[list[Logged], int]:
    """The records of a segment, and how many of its bytes they fill."""
    records: list[Logged] = []
    at = 0
    while (found := frame_at(data, at)) is not None:
        records.append(found[0])
        at = found[1]
    return records, at


def resync(data: bytes, at: int) -> int | None:
    """Where the next whole record after byte `at` starts, if any does."""
    at = data.find(_MAGIC, at + 1)
    while at >= 0:
        if frame_at(data, at) is not None:
            return at
        at = data.find(_MAGIC, at + 1)
    return None


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """All of `data`, or an OSError: a write that finds the disk nearly full writes part of it
    and says how much (no error), and the rest must then fail loudly, not go unwritten."""
    view = memoryview(data)
    while view:
        if offset is None:
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
            offset += written
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """A new file's name is durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
