"""The ingest log: what makes an embedded ingest request durable before its events are stored.

Embedded mode has no Kafka to replay from, and a request is answered only once it is durable
(DESIGN 1). Storing its events in a transaction of their own would cost their full size in
DuckDB's WAL and again at the next checkpoint, and a commit that writes anything waits for a
running checkpoint. So each accepted request is appended instead to files beside the database
(`<database>.ingest/`, one segment after another), fsynced before the request is answered: its
events as the validator gave them (Arrow IPC, zstd: ~50 bytes an event), which of them were
duplicates, and the seqs the others took. The flush that stores the events records, in its own
transaction, the last request they complete (`ingest_stored`); segments wholly before it are
deleted. At open, what the log holds after that mark is applied again exactly as it was.

A record is framed (magic, lengths, CRC-32), so a write cut short by a crash is recognized at
the end of the last segment and cut off: it was never answered.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import AggregatorError
from meters.events.schema import TIMESTAMP
from meters.ipc import Encoded, read_ipc

_MAGIC = b"MLG1"
_FRAME = struct.Struct("<4sIII")  # magic, header bytes, events bytes, CRC-32 of both
SEGMENT_BYTES = 64 * 1024 * 1024  # a new segment once the current one is this large


class LogCorrupt(AggregatorError):
    """A record before the last segment's end cannot be read: the log is damaged."""


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
    return int(con.execute("SELECT through FROM ingest_stored").fetchall()[0][0])


def mark_stored(con: duckdb.DuckDBPyConnection, through: int) -> None:
    """Record, in the flush's transaction, that requests up to `through` are stored."""
    con.execute("UPDATE ingest_stored SET through = greatest(through, ?)", [through])


class IngestLog:
    """The segments of one database. `append` is called by the writer thread (at a commit),
    `stored` by the flusher; `directory` None keeps nothing (a database in memory)."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._segments: list[tuple[Path, int]] = []  # (path, last id in it), oldest first
        self._file: int | None = None  # the last segment, open for appending
        self._size = 0

    def open(self, stored: int) -> list[Logged]:
        """Read every segment; return the requests after `stored`, in order."""
        if self._directory is None:
            return []
        self._directory.mkdir(parents=True, exist_ok=True)
        pending: list[Logged] = []
        paths = sorted(self._directory.glob("*.log"))
        for i, path in enumerate(paths):
            records, good = _read(path)
            if good < path.stat().st_size:
                if i < len(paths) - 1:
                    raise LogCorrupt(f"{path}: unreadable at byte {good}")
                os.truncate(path, good)  # a write cut short by a crash: never answered
            last = records[-1].id if records else -1
            self._segments.append((path, last))
            pending += [r for r in records if r.id > stored]
        if self._segments:
            path = self._segments[-1][0]
            self._file = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._size = path.stat().st_size
        return pending

    def append(self, records: list[Logged]) -> tuple[int, int, int]:
        """Append and fsync; returns where the log ended before (for `undo`). On failure the
        log is cut back to that point, and the error raised."""
        if self._directory is None or not records:
            return (-1, 0, -1)
        with self._lock:
            if self._file is None or self._size >= SEGMENT_BYTES:
                self._rotate(records[0].id)
            assert self._file is not None
            mark = (len(self._segments) - 1, self._size, self._segments[-1][1])
            data = b"".join(r.encode() for r in records)
            try:
                os.write(self._file, data)
                os.fsync(self._file)
            except BaseException:
                os.ftruncate(self._file, self._size)
                raise
            self._size += len(data)
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
            os.ftruncate(self._file, size)
            os.fsync(self._file)
            self._size = size
            self._segments[-1] = (self._segments[-1][0], last)

    def stored(self, through: int) -> None:
        """Requests up to `through` are stored: delete the segments that hold only those
        (the one being appended to stays)."""
        with self._lock:
            while len(self._segments) > 1 and self._segments[0][1] <= through:
                path, _ = self._segments.pop(0)
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None

    def _rotate(self, first_id: int) -> None:
        assert self._directory is not None
        if self._file is not None:
            os.close(self._file)
        path = self._directory / f"{first_id:020d}.log"
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._segments.append((path, -1))
        _fsync_directory(self._directory)


def _read(path: Path) -> tuple[list[Logged], int]:
    """The records of a segment, and how many of its bytes they fill."""
    data = path.read_bytes()
    records: list[Logged] = []
    at = 0
    while at + _FRAME.size <= len(data):
        magic, header_bytes, event_bytes, crc = _FRAME.unpack_from(data, at)
        start = at + _FRAME.size
        end = start + header_bytes + event_bytes
        if magic != _MAGIC or end > len(data):
            break
        header, events = data[start : start + header_bytes], data[start + header_bytes : end]
        if zlib.crc32(events, zlib.crc32(header)) != crc:
            break
        record_id, org, at_us, first, last, duplicates = orjson.loads(header)
        records.append(Logged(record_id, org, at_us, first, last, duplicates, events))
        at = end
    return records, at


def _fsync_directory(directory: Path) -> None:
    """A new segment's name is durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
