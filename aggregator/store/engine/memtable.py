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
from typing import Any, cast

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base import subjects
from aggregator.store.base.arrays import Column, distinct, numpy, uuids
from aggregator.store.base.ids import INGEST_LOG_PARTITION, ORIGIN, event_ids
from aggregator.store.base.rows import registered
from aggregator.store.engine import dedupe, ingest_log, ledger_log
from aggregator.store.engine.balances import Added
from aggregator.store.engine.segments import Change, Segments
from aggregator.store.metering import groups, partials
from aggregator.store.metering.rollups import Evaluated

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
    prefix, stores it and releases it. Beside them, each customer reference's first event time
    over the stored events (`event_subjects`, read at open), folded in as entries are released:
    with the entries', every applied event's, without a statement (`first_event_us`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Applied] = []
        self._first: dict[tuple[str, str], int] = {}  # (organization, subject) -> µs
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
        # Only the flusher releases, and the writer only appends: the prefix stays as it is.
        firsts = _first_times(self._entries[:count])
        with self._lock:
            gone, self._entries = self._entries[:count], self._entries[count:]
            self._added_at = self._added_at[count:]
            self._events -= sum(e.events.num_rows for e in gone)
            self.stored += count
            held = self._first
            for key, at in firsts:  # with the removal: a reader sees them pending or here
                if at < held.get(key, at + 1):
                    held[key] = at

    def load_first_times(self, con: duckdb.DuckDBPyConnection) -> None:
        """The stored events' first times (at open)."""
        rows = con.execute(
            "SELECT organization_id::VARCHAR, subject, epoch_us(first_timestamp)"
            " FROM event_subjects"
        ).fetchall()
        organizations: dict[str, str] = {}  # one string per organization, not one per row
        with self._lock:
            self._first = {(organizations.setdefault(o, o), s): t for o, s, t in rows}

    def first_event_us(
        self, organization_id: str, customer_id: str, external_id: str | None
    ) -> int | None:
        """The earliest timestamp of the customer's own events (by either of its ids), stored
        or applied."""
        names = [subjects.of_id(customer_id)]
        if external_id is not None:
            names.append(subjects.of_external(external_id))
        with self._lock:  # an event is in one or the other: read both at once, scan after
            stored = [self._first.get((organization_id, n)) for n in names]
            entries = list(self._entries)
        pending = first_time(entries, organization_id, customer_id, external_id)
        return min((t for t in (*stored, pending) if t is not None), default=None)


def keys_of(entries: list[Applied], seqs: npt.NDArray[np.int64]) -> dict[int, dedupe.Key | None]:
    """{seq: its dedupe key} of the events with these seqs among `entries` (each entry's seqs
    are consecutive: a binary search finds the entry, the seq the row)."""
    held = [e for e in entries if e.events.num_rows]
    if not held:
        return {}
    firsts = np.array([e.events.column("seq")[0].as_py() for e in held], np.int64)
    at = np.searchsorted(firsts, seqs, side="right") - 1
    found: dict[int, dedupe.Key | None] = {}
    for i in distinct(at[at >= 0]).tolist():
        events = held[i].events
        mine = seqs[at == i]
        rows = mine - firsts[i]
        mine, rows = mine[rows < events.num_rows], rows[rows < events.num_rows]
        found.update(zip(mine.tolist(), dedupe.keys(events, rows), strict=True))
    return found


def _first_times(entries: list[Applied]) -> list[tuple[tuple[str, str], int]]:
    """((organization, subject), earliest timestamp) of the events of `entries` but system ones,
    as the flush stores them in `event_subjects` (`_record_links`)."""
    found = []
    for entry in entries:
        events = entry.events
        if not events.num_rows:
            continue
        if "source" in events.column_names:
            events = events.filter(pc.not_equal(events.column("source"), pa.scalar("system")))
        named = pa.table(
            {
                "org": events.column("organization_id").cast(pa.string()),
                "customer": events.column("customer_id").cast(pa.string()),
                "external": events.column("external_customer_id"),
                "at": events.column("timestamp").cast(pa.int64()),
            }
        )
        # Grouped first (a batch names far fewer customers than it has rows), named after.
        grouped = named.group_by(["org", "customer", "external"]).aggregate([("at", "min")])
        for org, customer, external, at in zip(
            *(grouped.column(c).to_pylist() for c in ("org", "customer", "external", "at_min")),
            strict=True,
        ):
            if customer is not None:
                found.append(((org, subjects.of_id(customer)), at))
            elif external is not None:
                found.append(((org, subjects.of_external(external)), at))
    return found


def first_time(
    entries: list[Applied], organization_id: str, customer_id: str, external_id: str | None
) -> int | None:
    """The earliest timestamp (µs) of the events among `entries` whose subject is one of the
    customer's (`subjects`: the customer id, or no customer id and the external id)."""
    found: list[int] = []
    for entry in entries:
        events = entry.events
        if not events.num_rows:
            continue
        customer = events.column("customer_id")
        named = pc.equal(customer, pa.scalar(customer_id))
        if external_id is not None:
            external = pc.equal(events.column("external_customer_id"), pa.scalar(external_id))
            named = pc.or_kleene(named, pc.and_kleene(pc.is_null(customer), external))
        org = pc.equal(events.column("organization_id"), pa.scalar(organization_id))
        mine = pc.and_kleene(org, named)
        first = pc.min(pc.filter(events.column("timestamp"), mine)).cast(pa.int64()).as_py()
        if first is not None:
            found.append(first)
    return min(found, default=None)


def stored_events(events: pa.Table) -> pa.Table:
    """Applied events (`Applied.events`, with `ORIGIN` or not) as the events relation stores
    them (`events_base`'s columns, in its order and types), each with its id: its `id` column
    where it has one, else `ids.event_ids` (derived from where it was read; from its seq for
    events of the ingest log)."""
    n = events.num_rows
    seqs = numpy(events.column("seq"), np.int64)
    origin = {
        c.name: events.column(c.name) if c.name in events.column_names else None for c in ORIGIN
    }

    def filled(name: str, default: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        column = origin[name]
        if column is None:
            return default
        values = numpy(cast(Column, pc.fill_null(cast(Any, column), -1)), np.int64)
        return np.where(values < 0, default, values)

    if "id" in events.column_names:  # ids of their own (a system event's: `derived_id`)
        id_column: Any = uuids(events.column("id"))
    else:
        ingested = numpy(events.column("ingested_at").cast(pa.int64()), np.int64)
        ids = event_ids(
            ingested,
            filled("origin_partition", np.full(n, INGEST_LOG_PARTITION, np.int64)),
            filled("origin_offset", seqs),
            filled("origin_row", np.zeros(n, np.int64)),
        )
        id_column = pa.ExtensionArray.from_storage(
            pa.uuid(),
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(ids.data)]),
        )
    utc = pa.timestamp("us", tz="UTC")
    return pa.Table.from_arrays(
        [
            id_column,
            pa.array(seqs, pa.int64()),
            uuids(events.column("organization_id")),
            events.column("name"),
            events.column("source"),
            events.column("timestamp").cast(utc),
            events.column("ingested_at").cast(utc),
            uuids(events.column("customer_id")),
            events.column("external_customer_id"),
            events.column("external_member_id"),
            events.column("external_id"),
            events.column("parent_id"),
            events.column("metadata"),
            events.column("cost_amount").cast(pa.decimal128(17, 12)),
        ],
        names=list(EVENT_COLUMNS),
    )


# The events relation's columns, in order (`events_base`).
EVENT_COLUMNS = (
    *("id", "seq", "organization_id", "name", "source", "timestamp", "ingested_at"),
    *("customer_id", "external_customer_id", "external_member_id", "external_id", "parent_id"),
    *("metadata", "cost_amount"),
)


def _with_origin(events: pa.Table) -> pa.Table:
    """`events` with the `ORIGIN` columns (null where it has none), so that batches concatenate."""
    for column in ORIGIN:
        if column.name not in events.column_names:
            events = events.append_column(column, pa.nulls(events.num_rows, column.type))
    return events


def store(
    con: duckdb.DuckDBPyConnection,
    entries: list[Applied],
    segments: Segments,
    bound: groups.Bound,
    within: Change | None = None,
) -> tuple[int | None, Change]:
    """Store `entries` (inside the caller's transaction, whose changes of the files so far are
    `within`): their events and rollups as new segments (written, and listed in the
    transaction), the rest in tables. Return the last ingest log request they complete, if
    any, and the segments' change (for the caller to tell `segments` once the transaction has
    committed, or to abandon)."""
    change = Change()
    try:
        files: list[tuple[str, pa.Table]] = []
        tables = [_with_origin(e.events) for e in entries if e.events.num_rows]
        if tables:
            events = pa.concat_tables(tables).combine_chunks()
            files.append(("events", stored_events(events)))
            with registered(con, "_stored_events", events):
                con.execute(dedupe.INSERT_MOVED.format(events="_stored_events"))
                _record_links(con)
        evaluated = [ev for e in entries for ev in e.evaluated]
        found = partials.partials(con, evaluated, bound)
        groups.list_folded(con, found["rollup_groups"])
        files += [(r, t) for r, t in found.items() if t.num_rows]
        files += ledger_log.files_of(con, [Added.of(ev) for ev in evaluated])
        change.added += segments.write_all(files)
        segments.commit(con, change, None if within is None else within.then(change))
    except BaseException:
        segments.abandon(change)
        raise
    store_offsets(con, tuple((t, p, o) for e in entries for t, p, o in e.offsets))
    through = max((e.log_id for e in entries if e.log_id is not None), default=None)
    if through is not None:
        ingest_log.mark_stored(con, through)
    return through, change


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
    """Parent child counts and customers' first event times (of their own events: not the
    system events a credit or a reset makes), from `_stored_events`."""
    con.execute(
        "INSERT INTO event_children SELECT organization_id::UUID, parent_id, count(*)"
        " FROM _stored_events WHERE parent_id IS NOT NULL GROUP BY ALL"
        " ON CONFLICT DO UPDATE SET children = children + excluded.children"
    )
    con.execute(
        "INSERT INTO event_subjects"  # noqa: S608 - fixed text, values bound
        f" SELECT organization_id::UUID, {subjects.OF_EVENT}, min(timestamp)"
        " FROM _stored_events WHERE source <> 'system' GROUP BY ALL ON CONFLICT DO UPDATE"
        " SET first_timestamp = least(first_timestamp, excluded.first_timestamp)"
    )
