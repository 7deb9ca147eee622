"""Applied events not yet stored in DuckDB, and the one transaction that stores them.

Applying a batch (dedupe, seqs, every meter's contributions, the balances in memory) is cheap and
happens as the batch arrives; storing it is not: DuckDB writes a transaction's rows through its
WAL and compresses them again at the next checkpoint, which holds every other commit, unless a
transaction appends at least a row group (122,880 rows) of one table, which DuckDB writes
straight to the file, compressed, with nothing left for the checkpoint. So applied batches wait
here and are stored together (`store`): their events, their rollup and ledger deltas merged
across the batches, and where they came from (Kafka offsets, the ingest log's mark), in one
transaction, exactly once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from aggregator.store.base import subjects
from aggregator.store.base.ids import ORIGIN
from aggregator.store.base.rows import registered
from aggregator.store.machinery import dedupe, ingest_log, rollups
from aggregator.store.machinery.rollups import Evaluated
from meters.events import COLUMNS

# Rows DuckDB puts in a row group: an append of at least this many goes straight to the file.
ROW_GROUP = 122_880


# (topic, partition, next offset): positions in a log, stored with what they cover.
Positions = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class Applied:
    """One applied batch: its new `events` (as the events table takes them: `COLUMNS`,
    organization_id, ingested_at, source, seq; in seq order), their meters' contributions, and what
    storing them settles: Kafka offsets (topic, partition, next offset), the ingest log's requests
    up to `log_id`."""

    events: pa.Table
    evaluated: tuple[Evaluated, ...] = ()
    offsets: Positions = ()
    log_id: int | None = None


class Memtable:
    """The applied batches in order. The writer thread adds (at commit); the flusher takes a
    prefix, stores it and releases it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Applied] = []
        self._added_at: list[float] = []  # monotonic time each entry came
        self._events = 0
        self.added = 0  # entries ever added (a mark for barriers)
        self.stored = 0  # entries ever stored

    @property
    def events(self) -> int:
        return self._events

    def age(self) -> float:
        """How long the oldest entry has waited."""
        with self._lock:
            return time.monotonic() - self._added_at[0] if self._added_at else 0.0

    def add(self, entry: Applied) -> None:
        seqs = entry.events.column("seq")
        n = entry.events.num_rows
        assert not n or seqs[n - 1].as_py() - seqs[0].as_py() == n - 1, "seqs not consecutive"
        with self._lock:
            self._entries.append(entry)
            self._added_at.append(time.monotonic())
            self._events += entry.events.num_rows
            self.added += 1

    def take(self) -> list[Applied]:
        with self._lock:
            return list(self._entries)

    def release(self, count: int) -> None:
        """The first `count` entries are stored."""
        with self._lock:
            gone, self._entries = self._entries[:count], self._entries[count:]
            self._added_at = self._added_at[count:]
            self._events -= sum(e.events.num_rows for e in gone)
            self.stored += count


def keys_of(entries: list[Applied], seqs: npt.NDArray[np.int64]) -> dict[int, dedupe.Key | None]:
    """{seq: its dedupe key} of the events with these seqs among `entries` (each entry's seqs
    are consecutive: a binary search finds the entry, the seq the row)."""
    held = [e for e in entries if e.events.num_rows]
    if not held:
        return {}
    firsts = np.array([e.events.column("seq")[0].as_py() for e in held], np.int64)
    at = np.searchsorted(firsts, seqs, side="right") - 1
    found: dict[int, dedupe.Key | None] = {}
    for i in np.unique(at[at >= 0]).tolist():
        events = held[i].events
        mine = seqs[at == i]
        rows = mine - firsts[i]
        mine, rows = mine[rows < events.num_rows], rows[rows < events.num_rows]
        found.update(zip(mine.tolist(), dedupe.keys(events, rows), strict=True))
    return found


# The event's columns (`meters.events.COLUMNS`) as the table stores them.
_CASTS = {"customer_id": "::UUID", "cost_amount": "::DECIMAL(17, 12)"}
# An event's id is derived from where it was read (`ids.ORIGIN`): a version 7 UUID whose time
# is its ingest time (ids sort by it), then the partition (12 bits; 4095 for the ingest log),
# the offset (44 bits; the seq for the ingest log) and the row (18 bits).
_ID = (
    "printf('%08x-%04x-%04x-%04x-%012x', ms >> 16, ms & 65535, 28672 + part,"
    " 32768 + (place >> 48), place & 281474976710655)::UUID"
)
_INSERT_EVENTS = (
    f"INSERT INTO events (id, seq, organization_id, ingested_at, {', '.join(COLUMNS.names)})"  # noqa: S608 - fixed text, values bound
    f" SELECT {_ID}, seq, organization_id::UUID, ingested_at,"
    f" {', '.join(name + _CASTS.get(name, '') for name in COLUMNS.names)} FROM ("
    " SELECT *, epoch_ms(ingested_at)::UBIGINT AS ms,"
    " coalesce(origin_partition, 4095)::UBIGINT & 4095 AS part,"
    " ((coalesce(origin_offset, seq)::UBIGINT & 17592186044415) << 18)"
    " | (coalesce(origin_row, 0)::UBIGINT & 262143) AS place FROM _stored_events)"
)


def _with_origin(events: pa.Table) -> pa.Table:
    """`events` with the `ORIGIN` columns (null where it has none), so that batches concatenate."""
    for column in ORIGIN:
        if column.name not in events.column_names:
            events = events.append_column(column, pa.nulls(events.num_rows, column.type))
    return events


def store(con: duckdb.DuckDBPyConnection, entries: list[Applied]) -> int | None:
    """Store `entries` (inside the caller's transaction); return the last ingest log request
    they complete, if any."""
    tables = [_with_origin(e.events) for e in entries if e.events.num_rows]
    if tables:
        # One contiguous table: DuckDB then appends it as whole row groups (see the module).
        with registered(con, "_stored_events", pa.concat_tables(tables).combine_chunks()):
            con.execute(_INSERT_EVENTS)
            con.execute(dedupe.INSERT_MOVED.format(events="_stored_events"))
            _record_links(con)
    rollups.store(con, [ev for e in entries for ev in e.evaluated])
    store_offsets(con, tuple((t, p, o) for e in entries for t, p, o in e.offsets))
    through = max((e.log_id for e in entries if e.log_id is not None), default=None)
    if through is not None:
        ingest_log.mark_stored(con, through)
    return through


def store_offsets(con: duckdb.DuckDBPyConnection, offsets: Positions) -> None:
    """(topic, partition, next offset) as stored positions; of one partition's, the last."""
    last = {(t, p): o for t, p, o in offsets}
    if last:
        con.executemany(
            "INSERT INTO kafka_offsets VALUES (?, ?, ?)"
            " ON CONFLICT DO UPDATE SET next_offset = excluded.next_offset",
            [[t, p, o] for (t, p), o in last.items()],
        )


def _record_links(con: duckdb.DuckDBPyConnection) -> None:
    """Parent child counts and customers' first event times, from `_stored_events`."""
    con.execute(
        "INSERT INTO event_children SELECT organization_id::UUID, parent_id, count(*)"
        " FROM _stored_events WHERE parent_id IS NOT NULL GROUP BY ALL"
        " ON CONFLICT DO UPDATE SET children = children + excluded.children"
    )
    con.execute(
        "INSERT INTO event_subjects"  # noqa: S608 - fixed text, values bound
        f" SELECT organization_id::UUID, {subjects.OF_EVENT}, min(timestamp)"
        " FROM _stored_events GROUP BY ALL ON CONFLICT DO UPDATE"
        " SET first_timestamp = least(first_timestamp, excluded.first_timestamp)"
    )
