"""The ledger's durable image (decision 17). The balances in memory (`balances`) are the
ledger's truth; what a start reads back is the newest checkpoint of them (files: the relations
`segments.LEDGER_RELATIONS`), the changes other than usage added that jobs made since
(`ledger_changes`, in order), and the usage added since (the delta tables).

1. A flush appends its batches' usage to the deltas (`append`), in its transaction.
2. A job's change of the balances (`Live.change_ledger`) is written in its transaction
   (`record`): usage added is appended to the deltas; any other change deletes the delta rows
   it covers and is listed in `ledger_changes`. So every delta row left was added after every
   change listed that covers it.
3. A checkpoint (`Checkpoint.take`; the flusher's, every `every_seconds` once anything was
   written since, and at a clean stop), under the store's `exclusive` (no flush, no job):
   a. what is applied is stored, then again under the balances' lock (no commit's effects
      meanwhile), and the balances are read out there: they then hold exactly what the files,
      the changes and the deltas hold (if a batch is left unstored, none is taken: its usage
      would be applied again at a start);
   b. off that lock, they are written as one file per relation (segments' step 1);
   c. one transaction lists them in place of the relations' files and empties the deltas and
      `ledger_changes`. A crash before its COMMIT leaves the files to segments' step 5 and the
      image as it was; the files it retires wait out segments' grace (a snapshot copying them).
4. At open (`load`): the files, then the changes in order, then the deltas (step 2: no change
   needs to come after a delta).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from aggregator.store.base.arrays import encoded
from aggregator.store.base.rows import among, registered, transaction
from aggregator.store.engine.balances import (
    Added,
    Balances,
    Cleared,
    Forgotten,
    LedgerChange,
    MeterDropped,
    ValuesDropped,
)
from aggregator.store.engine.segments import LEDGER_RELATIONS, MAX_LEVEL, Change, Segments

log = logging.getLogger(__name__)

# The usage added since the checkpoint: numbers, unique values, points.
DELTAS = ("ledger_usage_deltas", "ledger_usage_value_deltas", "ledger_point_deltas")
_CHECKPOINTED = tuple(f"checkpointed_{r}" for r in LEDGER_RELATIONS)  # their views
_WRITTEN = (*DELTAS, "ledger_changes")  # what a checkpoint empties


def append(con: duckdb.DuckDBPyConnection, added: Sequence[Added]) -> None:
    """Step 1 (and 2's usage): usage added, merged per key across `added` (one source's:
    their tables' columns alike)."""
    _insert(
        con,
        [a.numbers for a in added],
        "INSERT INTO ledger_usage_deltas SELECT meter_id::UUID, subject, sum(events), sum(total),"
        " min(low), max(high), make_timestamptz(min(first_us)), make_timestamptz(max(last_us))"
        " FROM _rows GROUP BY ALL",
    )
    _insert(
        con,
        [a.values for a in added],
        "INSERT INTO ledger_usage_value_deltas"
        " SELECT DISTINCT meter_id::UUID, subject, value FROM _rows",
    )
    # As they come: a start takes each subject's greatest.
    _insert(
        con,
        [a.points for a in added],
        "INSERT INTO ledger_point_deltas SELECT meter_id::UUID, subject, at_us, value FROM _rows",
    )


def _insert(con: duckdb.DuckDBPyConnection, tables: list[pa.Table], statement: str) -> None:
    rows = [t for t in tables if t.num_rows]
    if rows:
        with registered(con, "_rows", pa.concat_tables(rows)):
            con.execute(statement)


def record(con: duckdb.DuckDBPyConnection, change: LedgerChange) -> None:
    """Step 2, in the job's transaction on `con`."""
    if isinstance(change, Added):
        append(con, [change])
        return
    subjects: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    match change:
        case Cleared(meter_id, subjects):
            _delete(con, DELTAS, "meter_id = ?::UUID", [meter_id], subjects)
            row = ["cleared", None, meter_id]
        case ValuesDropped(meter_id, subject, dropped):
            which, params = among("value", dropped)
            subjects, row = (subject,), ["values_dropped", None, meter_id]
            _delete(
                con, DELTAS[1:2], f"meter_id = ?::UUID AND {which}", [meter_id, *params], subjects
            )
        case MeterDropped(meter_id):
            _delete(con, DELTAS, "meter_id = ?::UUID", [meter_id])
            row = ["meter_dropped", None, meter_id]
        case Forgotten(organization_id, subjects):
            of_org = "meter_id IN (SELECT id FROM meters WHERE organization_id = ?::UUID)"
            _delete(con, DELTAS, of_org, [organization_id], subjects)
            row = ["forgotten", organization_id, None]
    con.execute(
        "INSERT INTO ledger_changes SELECT coalesce(max(id), 0) + 1, ?, ?, ?, ?, ?"
        " FROM ledger_changes",
        [*row, list(subjects), list(dropped)],
    )


def _delete(
    con: duckdb.DuckDBPyConnection,
    tables: Sequence[str],
    where: str,
    params: list[object],
    subjects: Sequence[str] | None = None,
) -> None:
    if subjects is not None:
        which, more = among("subject", subjects)
        where, params = f"{where} AND {which}", [*params, *more]
    for table in tables:  # names from `DELTAS` only
        con.execute(f"DELETE FROM {table} WHERE {where}", params)  # noqa: S608 - fixed text, values bound


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


def load(con: duckdb.DuckDBPyConnection, balances: Balances) -> None:
    """Step 4 (at open, before any write)."""
    _add(balances, _stored(con, _CHECKPOINTED, grouped=False))
    for row in con.execute(
        "SELECT kind, organization_id, meter_id, subjects, dropped FROM ledger_changes ORDER BY id"
    ).fetchall():
        balances.apply(_change(*row))
    _add(balances, _stored(con, DELTAS, grouped=True))
    balances.compact()


def _add(balances: Balances, tables: tuple[pa.Table, pa.Table, pa.Table]) -> None:
    for org, (numbers, values, points) in _per_organization(tables).items():
        balances.add(org, numbers, values, points)


class Checkpoint:
    """Step 3: the flusher's (`Flusher._upkeep`), on its cursor, under `exclusive`."""

    def __init__(
        self,
        balances: Balances,
        segments: Segments,
        *,
        every_seconds: float,
    ) -> None:
        self._balances = balances
        self._segments = segments
        self._every = every_seconds
        self._taken_at = time.monotonic()
        self.taken = 0
        self.longest_locked_seconds = 0.0  # the longest the balances' lock was held (3a)

    def due(self) -> bool:
        return time.monotonic() - self._taken_at >= self._every

    @staticmethod
    def _written(con: duckdb.DuckDBPyConnection) -> bool:
        """Whether anything was written since the last."""
        exists = " OR ".join(f"EXISTS (SELECT 1 FROM {t})" for t in _WRITTEN)  # noqa: S608 - fixed text
        return bool(con.execute(f"SELECT {exists}").fetchall()[0][0])

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
            exported = balances.export() if store_all() else None
            locked = time.perf_counter() - started
        if exported is None:
            log.warning("ledger checkpoint skipped: applied batches left unstored")
            return False
        numbers, values, points = exported
        self.longest_locked_seconds = max(self.longest_locked_seconds, locked)
        tables = _as_stored(numbers, values, points)
        segments = self._segments
        written = segments.write_all(
            [(r, t) for r, t in zip(LEDGER_RELATIONS, tables, strict=True) if t.num_rows],
            MAX_LEVEL,
        )
        change = Change(written, [s for r in LEDGER_RELATIONS for s in segments.live(r)])
        listed = False
        try:
            with transaction(con):
                segments.commit(con, change)
                for table in _WRITTEN:  # fixed names
                    con.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed text
            listed = True
        finally:
            if not listed:
                segments.abandon(change)
        segments.committed(change)
        self.taken += 1
        log.debug("ledger checkpoint: %d rows, %.3f s under the lock", numbers.num_rows, locked)
        return True


def _as_stored(numbers: pa.Table, values: pa.Table, points: pa.Table) -> list[pa.Table]:
    """`Balances.export`'s tables as the relations' files hold them (their base tables'
    columns, sorted by key)."""
    utc = pa.timestamp("us", tz="UTC")
    numbers = pa.table(
        {
            **{n: numbers.column(n) for n in ("meter_id", "subject", "events", "total", "low")},
            "high": numbers.column("high"),
            "created_at": numbers.column("first_us").cast(utc),
            "modified_at": numbers.column("last_us").cast(utc),
        }
    )
    return [
        t.sort_by([("meter_id", "ascending"), ("subject", "ascending")])
        for t in (numbers, values, points)
    ]


def _stored(
    con: duckdb.DuckDBPyConnection, tables: tuple[str, ...], *, grouped: bool
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The usage `tables` hold (numbers', values', points'), as `Balances.add` takes it, with
    each row's organization_id (a meter's). `grouped`: merged per key (the deltas); else a
    row per key already (a checkpoint's: grouping a million rows took a start three times as
    long as reading them)."""
    numbers_from, values_from, points_from = tables

    def each(aggregate: str, column: str) -> str:
        """`column` merged over a key's rows, where they are grouped."""
        return f"{aggregate}({column})" if grouped else column

    group_by = " GROUP BY ALL" if grouped else ""
    numbers = con.sql(
        "SELECT m.organization_id::VARCHAR AS organization_id, u.meter_id::VARCHAR AS"  # noqa: S608 - fixed text
        f" meter_id, subject, {each('sum', 'events')}::BIGINT AS events,"
        f" {each('sum', 'total')} AS total, {each('min', 'low')} AS low,"
        f" {each('max', 'high')} AS high, epoch_us({each('min', 'u.created_at')}) AS first_us,"
        f" epoch_us({each('max', 'u.modified_at')}) AS last_us"
        f" FROM {numbers_from} u JOIN meters m ON m.id = u.meter_id{group_by}"
    ).to_arrow_table()
    values = con.sql(
        f"SELECT {'DISTINCT' if grouped else ''} m.organization_id::VARCHAR AS organization_id,"  # noqa: S608 - fixed text
        " v.meter_id::VARCHAR AS meter_id, subject, value"
        f" FROM {values_from} v JOIN meters m ON m.id = v.meter_id"
    ).to_arrow_table()
    point = each("max", "{'at_us': at_us, 'value': value}")  # the greatest (instant, value)
    points = con.sql(
        "SELECT organization_id, meter_id, subject, p.at_us AS at_us, p.value AS value FROM"  # noqa: S608 - fixed text
        " (SELECT m.organization_id::VARCHAR AS organization_id, p.meter_id::VARCHAR AS"
        f" meter_id, subject, {point} AS p"
        f" FROM {points_from} p JOIN meters m ON m.id = p.meter_id{group_by})"
    ).to_arrow_table()
    return numbers, values, points


def _per_organization(tables: tuple[pa.Table, ...]) -> dict[str, list[pa.Table]]:
    """`tables`' rows per organization (its `organization_id` column), in one sort each."""
    out: dict[str, list[pa.Table]] = {}
    for i, table in enumerate(tables):
        if not table.num_rows:
            continue
        organizations, codes = encoded(table.column("organization_id"))
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(organizations) + 1))
        for code, org in enumerate(organizations):
            parts = out.setdefault(str(org), [t.slice(0, 0) for t in tables])
            rows = order[bounds[code] : bounds[code + 1]]
            parts[i] = table if len(organizations) == 1 else table.take(rows)
    return out
