"""The ledger's durable image (decision 17). The balances in memory (`balances`) are the
ledger's truth; what a start reads back is their newest checkpoint and what changed since, in
order: the files of `segments.LEDGER_RELATIONS` (the checkpoint's, then a file of the usage
each flush or job added), and the other changes jobs made (`ledger_changes`), each placed
among the files by `after`, the number of the last file written before it.

1. A flush writes its batches' usage as files (`files_of`) with its others, listed in its
   transaction; a job writes the usage it adds alike (`Live.add_ledger_usage`).
2. A job's other change (a reset's, a correction's, a customer's deletion, a redefinition) is
   listed in `ledger_changes` in its transaction (`record`), with `after`.
3. A checkpoint (`Checkpoint.take`; the flusher's, every `every_seconds` once anything was
   written since, and at a clean stop), under the store's `exclusive` (no flush, no job):
   a. what is applied is stored, then again under the balances' lock (no commit's effects
      meanwhile), and the balances are read out there: they then hold exactly what the files
      and the changes hold (if a batch is left unstored, none is taken: its usage would be
      applied again at a start);
   b. off that lock, they are written as one file per relation (segments' step 1);
   c. one transaction lists them in place of every ledger file and empties `ledger_changes`.
      A crash before its COMMIT leaves the files to segments' step 5 and the image as it
      was; the files it retires wait out segments' grace (a snapshot copying them).
4. At open (`load`): the files in the order of their numbers, each change after the files
   numbered up to its `after`. Files are never merged (`Relation.merged` is None): a file's
   number is its place.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from aggregator.store.base.arrays import encoded
from aggregator.store.base.rows import registered, transaction
from aggregator.store.engine.balances import (
    Added,
    Balances,
    Cleared,
    Forgotten,
    LedgerChange,
    MeterDropped,
    ValuesDropped,
)
from aggregator.store.engine.segments import LEDGER_RELATIONS, Change, Segment, Segments

log = logging.getLogger(__name__)

_NUMBERS, _VALUES, _POINTS = LEDGER_RELATIONS
_UTC = pa.timestamp("us", tz="UTC")


def files_of(con: duckdb.DuckDBPyConnection, added: Sequence[Added]) -> list[tuple[str, pa.Table]]:
    """Step 1: the usage `added` (one source's: their tables' columns alike) as the rows of
    the ledger's relations, one per key (merged across `added` on `con`), for files."""
    numbers = _concat([a.numbers for a in added])
    values = _concat([a.values for a in added])
    points = _concat([a.points for a in added])
    if len(added) > 1:  # a key in several batches of a flush
        numbers = _grouped(con, numbers, _MERGED_NUMBERS)
        values = _grouped(con, values, "SELECT DISTINCT * FROM _rows")
        points = _grouped(con, points, _GREATEST_POINTS)
    out = []
    if numbers is not None:
        out.append((_NUMBERS, _as_stored(numbers)))
    if values is not None:
        out.append((_VALUES, values.select(["meter_id", "subject", "value"])))
    if points is not None:
        out.append((_POINTS, points.select(["meter_id", "subject", "at_us", "value"])))
    return out


_MERGED_NUMBERS = (
    "SELECT meter_id, subject, sum(events)::BIGINT AS events, sum(total) AS total,"
    " min(low) AS low, max(high) AS high, min(first_us) AS first_us, max(last_us) AS last_us"
    " FROM _rows GROUP BY ALL"
)
_GREATEST_POINTS = (
    "SELECT meter_id, subject, p.at_us AS at_us, p.value AS value FROM (SELECT meter_id,"
    " subject, max({'at_us': at_us, 'value': value}) AS p FROM _rows GROUP BY ALL)"
)


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    rows = [t for t in tables if t.num_rows]
    return pa.concat_tables(rows) if rows else None


def _grouped(con: duckdb.DuckDBPyConnection, table: pa.Table | None, query: str) -> pa.Table | None:
    if table is None:
        return None
    with registered(con, "_rows", table):
        grouped: pa.Table = con.sql(query).to_arrow_table()
    return grouped


def _as_stored(numbers: pa.Table) -> pa.Table:
    """Usage numbers (`Added.numbers`' columns) as the `ledger_usage` relation keeps them."""
    columns = ("meter_id", "subject", "events", "total", "low", "high")
    return pa.table(
        {
            **{n: numbers.column(n) for n in columns},
            "created_at": numbers.column("first_us").cast(_UTC),
            "modified_at": numbers.column("last_us").cast(_UTC),
        }
    )


def record(con: duckdb.DuckDBPyConnection, change: LedgerChange, after: int) -> None:
    """Step 2, in the job's transaction on `con`: a change other than usage added."""
    subjects: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    match change:
        case Added():
            raise TypeError("usage added is written as files (`files_of`)")
        case Cleared(meter_id, subjects):
            row = ["cleared", None, meter_id]
        case ValuesDropped(meter_id, subject, dropped):
            subjects, row = (subject,), ["values_dropped", None, meter_id]
        case MeterDropped(meter_id):
            row = ["meter_dropped", None, meter_id]
        case Forgotten(organization_id, subjects):
            row = ["forgotten", organization_id, None]
    con.execute(
        "INSERT INTO ledger_changes SELECT coalesce(max(id), 0) + 1, ?, ?, ?, ?, ?, ?"
        " FROM ledger_changes",
        [after, *row, list(subjects), list(dropped)],
    )


def _change(
    kind: str, organization_id: str, meter_id: str, subjects: list[str], dropped: list[str]
) -> LedgerChange:
    """A row of `ledger_changes` as the change `record` listed."""
    if kind == "cleared":
        return Cleared(meter_id, tuple(subjects))
    if kind == "values_dropped":
        return ValuesDropped(meter_id, subjects[0], tuple(dropped))
    if kind == "meter_dropped":
        return MeterDropped(meter_id)
    return Forgotten(organization_id, tuple(subjects))


def load(con: duckdb.DuckDBPyConnection, balances: Balances, segments: Segments) -> None:
    """Step 4 (at open, before any write; or of a database no store has open)."""
    changes = con.execute(
        "SELECT after, kind, organization_id, meter_id, subjects, dropped FROM ledger_changes"
        " ORDER BY id"
    ).fetchall()
    afters = [int(c[0]) for c in changes]
    files = sorted(_files(segments.listed(con)), key=lambda s: s.number)
    applied = 0
    for segment in files:
        place = bisect.bisect_left(afters, segment.number)  # changes before it
        for row in changes[applied:place]:
            balances.apply(_change(*row[1:]))
        applied = max(applied, place)
        _add(balances, con, segments, segment)
    for row in changes[applied:]:
        balances.apply(_change(*row[1:]))
    balances.compact()


def _files(listed: Sequence[Segment]) -> list[Segment]:
    return [s for s in listed if s.relation in LEDGER_RELATIONS]


# Each relation's rows as `Balances.add` takes them, with each row's organization (its
# meter's): `{file}` is read.
_READ = {
    _NUMBERS: "SELECT m.organization_id::VARCHAR AS organization_id, u.meter_id::VARCHAR AS"
    " meter_id, subject, events, total, low, high, epoch_us(u.created_at) AS first_us,"
    " epoch_us(u.modified_at) AS last_us FROM {file} u JOIN meters m ON m.id = u.meter_id",
    _VALUES: "SELECT m.organization_id::VARCHAR AS organization_id, v.meter_id::VARCHAR AS"
    " meter_id, subject, value FROM {file} v JOIN meters m ON m.id = v.meter_id",
    _POINTS: "SELECT m.organization_id::VARCHAR AS organization_id, p.meter_id::VARCHAR AS"
    " meter_id, subject, at_us, value FROM {file} p JOIN meters m ON m.id = p.meter_id",
}
_NONE = pa.table({})


def _add(
    balances: Balances, con: duckdb.DuckDBPyConnection, segments: Segments, segment: Segment
) -> None:
    """A file's rows (a row per key: no grouping) into `balances`."""
    read = _READ[segment.relation].format(file=f"read_parquet('{segments.path(segment)}')")
    rows = con.sql(read).to_arrow_table()
    at = LEDGER_RELATIONS.index(segment.relation)
    for org, part in _per_organization(rows).items():
        tables = [_NONE, _NONE, _NONE]
        tables[at] = part
        balances.add(org, *tables)


def _per_organization(table: pa.Table) -> dict[str, pa.Table]:
    """`table`'s rows per organization (its `organization_id` column), in one sort."""
    if not table.num_rows:
        return {}
    organizations, codes = encoded(table.column("organization_id"))
    if len(organizations) == 1:
        return {str(organizations[0]): table}
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(organizations) + 1))
    return {
        str(org): table.take(order[bounds[code] : bounds[code + 1]])
        for code, org in enumerate(organizations)
    }


def checkpoint_files(
    segments: Segments,
    exported: tuple[pa.Table, pa.Table, pa.Table],
    within: Change | None = None,
) -> Change:
    """Step 3b: balances read out whole (`Balances.export`) as files, and the change that
    lists them in place of every ledger file (as the caller's transaction's changes so far,
    `within`, leave them), for the caller to commit with `ledger_changes` emptied."""
    numbers, values, points = exported
    tables = [(_NUMBERS, _as_stored(numbers)), (_VALUES, values), (_POINTS, points)]
    written = segments.write_all([(r, t) for r, t in tables if t.num_rows])
    return Change(written, [s for r in LEDGER_RELATIONS for s in segments.files(r, within)])


class Checkpoint:
    """Step 3: the flusher's (`Flusher._upkeep`), on its cursor, under `exclusive`."""

    def __init__(self, balances: Balances, segments: Segments, *, every_seconds: float) -> None:
        self._balances = balances
        self._segments = segments
        self._every = every_seconds
        self._taken_at = time.monotonic()
        # The ledger's files as the last checkpoint left them (at open: as found, which may
        # hold files added since one: they wait for the next).
        self._left = self._listed()
        self.taken = 0
        self.longest_locked_seconds = 0.0  # the longest the balances' lock was held (3a)

    def _listed(self) -> set[int]:
        return {s.number for r in LEDGER_RELATIONS for s in self._segments.live(r)}

    def due(self) -> bool:
        return time.monotonic() - self._taken_at >= self._every

    def _written(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Whether anything was written since the last."""
        files = self._listed()
        changed = con.execute("SELECT EXISTS (SELECT 1 FROM ledger_changes)").fetchall()
        return files != self._left or bool(changed[0][0])

    def take(self, con: duckdb.DuckDBPyConnection, store_all: Callable[[], bool]) -> bool:
        """Steps 3a-3c (`store_all`: store every applied batch, on `con`; whether none is
        left unstored), if anything was written since the last; whether one was taken."""
        self._taken_at = time.monotonic()
        store_all()
        if not self._written(con):
            return False
        balances = self._balances
        with balances.lock:
            started = time.perf_counter()
            # Usage applied but not stored would be in the checkpoint and applied again.
            whole = store_all()
            exported = balances.export() if whole else None
            locked = time.perf_counter() - started
        if exported is None:
            log.warning("ledger checkpoint skipped: applied batches left unstored")
            return False
        self.longest_locked_seconds = max(self.longest_locked_seconds, locked)
        segments = self._segments
        change, listed = checkpoint_files(segments, exported), False
        try:
            with transaction(con):
                segments.commit(con, change)
                con.execute("DELETE FROM ledger_changes")
            listed = True
        finally:
            if not listed:
                segments.abandon(change)
        segments.committed(change)
        self._left = {s.number for s in change.added}
        self.taken += 1
        log.debug("ledger checkpoint: %.3f s under the balances' lock", locked)
        return True
