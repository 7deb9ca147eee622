"""Rollups: each meter's mergeable partial aggregates, kept current by ingest and backfill.

Per (meter, customer reference, 15-minute UTC bucket): the number of events in the meter, the
sum, min and max of their contributions (count: 1 each) and, for unique meters, the set of
distinct values. Any interval in any timezone is a union of buckets, so quantities merge rows
instead of rescanning events. Deltas are appended; readers read the `all_*` views (the keyed
tables and their deltas, see `compaction`).

Applying events is two steps. `evaluate` computes, in one statement, every meter's contribution
of every event (each metadata document parsed once for every path the meters use), and from
them the ledger's usage per customer reference (which the in-memory balances take at once).
`store` appends a list of evaluated batches' partial aggregates to the delta tables, grouped
across the batches: ingest stores them when the events are flushed, backfill at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store import subjects
from aggregator.store.meter_sql import Extracted, contribution_sql, filter_sql
from aggregator.store.rows import registered
from meters.aggregations import UniqueAggregation

if TYPE_CHECKING:
    from aggregator.store.meter_tables import MeterRow

# Rollups sum events per 15 minutes: quantities read whole buckets from them, the rest from events.
BUCKET_MINUTES = 15
BUCKET_US = BUCKET_MINUTES * 60 * 1_000_000
BUCKET = f"time_bucket(INTERVAL {BUCKET_MINUTES} MINUTE, timestamp)"

# Meters per statement: DuckDB dies (SIGFPE) on one statement of some thousands of aggregates
# (5,000 meters' four each did), and a statement's planning time grows with its columns.
METERS_PER_STATEMENT = 100


@dataclass(frozen=True, slots=True)
class Evaluated:
    """One batch's contributions to one organization's `meters`, evaluated at `at_us`.

    `values`: (subject, bucket, seq, v0 .. vN), vI meter I's contribution of the event (NULL:
    not in the meter). `ledger`: per number meter and customer reference, (meter_id, subject,
    events, total, low, high) of the events the ledger counts; `ledger_values`: per unique
    meter, (meter_id, subject, value)."""

    organization_id: str
    meters: tuple[MeterRow, ...]
    values: pa.Table
    ledger: pa.Table
    ledger_values: pa.Table
    at_us: int

    @property
    def definitions(self) -> tuple[tuple[str, int], ...]:
        """What the columns of `values` mean: (meter id, version) of v0 .. vN."""
        return tuple((m.id, m.version) for m in self.meters)


def evaluate(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
    *,
    at_us: int,
    backfill: bool = False,
    ledger: bool = True,
) -> Evaluated:
    """The contributions of the events of `source` selected by `where` to `meters` (of one
    organization). Live ingest applies events newer than any reset; a `backfill` (of stored
    events) leaves out of the ledger the events a customer's reset has already closed.
    `ledger=False` leaves the ledger out (to measure what it costs)."""
    values = _evaluated(con, meters, source, where, params)
    numbers = [(i, m) for i, m in enumerate(meters) if not _is_unique(m) and ledger]
    uniques = [(i, m) for i, m in enumerate(meters) if _is_unique(m) and ledger]
    if backfill:
        with registered(con, "_values", values):
            usage = _table(con, *_ledger_numbers(numbers)) if numbers else _EMPTY_NUMBERS
            usage_values = _table(con, *_ledger_uniques(uniques)) if uniques else _EMPTY_VALUES
    else:
        usage, usage_values = _live_ledger(values, numbers, uniques)
    return Evaluated(
        meters[0].organization_id if meters else "",
        tuple(meters),
        values,
        usage,
        usage_values,
        at_us,
    )


def _evaluated(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
) -> pa.Table:
    """`_values` of every meter, one statement per `METERS_PER_STATEMENT` of them, their
    columns joined side by side (each ordered by seq, so their rows line up)."""
    if len(meters) <= METERS_PER_STATEMENT:
        return _table(con, *_values(meters, source, where, params))
    values: pa.Table | None = None
    for first in range(0, len(meters), METERS_PER_STATEMENT):
        chunk = meters[first : first + METERS_PER_STATEMENT]
        query, query_params = _values(chunk, source, where, params, first=first)
        part = _table(con, query + " ORDER BY seq", query_params)
        if values is None:
            values = part
            continue
        for name in part.column_names[len(_KEYS) :]:
            values = values.append_column(name, part.column(name))
    assert values is not None
    return values


def _table(con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None) -> pa.Table:
    table: pa.Table = con.sql(query, params=params).to_arrow_table()
    return table


def store(con: duckdb.DuckDBPyConnection, batches: Sequence[Evaluated]) -> None:
    """Append the batches' partial aggregates to the rollup and ledger deltas, merged across
    batches: each (meter, customer reference, bucket) once, however many batches had it."""
    by_definition: dict[tuple[tuple[str, int], ...], list[Evaluated]] = {}
    for batch in batches:
        if batch.meters:
            by_definition.setdefault(batch.definitions, []).append(batch)
    for group in by_definition.values():
        meters = group[0].meters
        with registered(con, "_values", pa.concat_tables([b.values for b in group])):
            _store_rollups(con, meters)
    ledgers = [_timed(b.ledger, b.at_us) for b in batches if b.ledger.num_rows]
    if ledgers:
        with registered(con, "_ledger", pa.concat_tables(ledgers)):
            con.execute(
                "INSERT INTO ledger_usage_deltas SELECT meter_id::UUID, subject, sum(events),"
                " sum(total), min(low), max(high), make_timestamptz(min(at_us)),"
                " make_timestamptz(max(at_us)) FROM _ledger GROUP BY ALL"
            )
    values = [b.ledger_values for b in batches if b.ledger_values.num_rows]
    if values:
        with registered(con, "_ledger_values", pa.concat_tables(values)):
            con.execute(
                "INSERT INTO ledger_usage_value_deltas"
                " SELECT DISTINCT meter_id::UUID, subject, value FROM _ledger_values"
            )


def _timed(table: pa.Table, at_us: int) -> pa.Table:
    return table.append_column("at_us", pa.array(np.full(table.num_rows, at_us, np.int64)))


def _is_unique(meter: MeterRow) -> bool:
    return isinstance(meter.aggregation, UniqueAggregation)


def _number_parts(meters: list[tuple[int, MeterRow]]) -> tuple[str, list[Any]]:
    parts = ", ".join(
        f"{{'m': ?::UUID, 'n': count(v{i}), 't': sum(v{i}), 'l': min(v{i}), 'h': max(v{i})}}"
        for i, _ in meters
    )
    return parts, [m.id for _, m in meters]


def _value_parts(meters: list[tuple[int, MeterRow]]) -> tuple[str, list[Any]]:
    return ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i, _ in meters), [m.id for _, m in meters]


def _store_rollups(con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow]) -> None:
    """The registered `_values`' partial aggregates per meter, customer reference and bucket,
    appended to the rollup deltas: one pair of statements per `METERS_PER_STATEMENT`."""
    indexed = list(enumerate(meters))
    for first in range(0, len(indexed), METERS_PER_STATEMENT):
        _store_chunk(con, indexed[first : first + METERS_PER_STATEMENT])


def _store_chunk(con: duckdb.DuckDBPyConnection, meters: list[tuple[int, MeterRow]]) -> None:
    numbers = [(i, m) for i, m in meters if not _is_unique(m)]
    uniques = [(i, m) for i, m in meters if _is_unique(m)]
    if numbers:
        parts, ids = _number_parts(numbers)
        con.execute(
            f"INSERT INTO rollup_deltas SELECT p.m, subject, bucket, p.n, p.t, p.l, p.h FROM"  # noqa: S608 - fixed text, values bound
            f" (SELECT subject, bucket, unnest([{parts}]) AS p FROM _values"
            " GROUP BY subject, bucket) WHERE p.n > 0",
            ids,
        )
    if uniques:
        parts, ids = _value_parts(uniques)
        con.execute(
            "INSERT INTO rollup_value_deltas SELECT DISTINCT p.m, subject, bucket, p.v FROM"  # noqa: S608 - fixed text, values bound
            f" (SELECT subject, bucket, unnest([{parts}]) AS p FROM _values) WHERE p.v IS NOT NULL",
            ids,
        )


def _ledger_numbers(meters: list[tuple[int, MeterRow]]) -> tuple[str, list[Any]]:
    """(meter_id, subject, events, total, low, high) of the registered `_values` (a
    backfill's): only the events after their customer's latest reset."""
    parts, ids = _value_parts(meters)
    return (
        "SELECT meter_id::VARCHAR AS meter_id, subject, count(*) AS events, sum(v) AS total,"  # noqa: S608 - fixed text, values bound
        " min(v) AS low, max(v) AS high FROM (SELECT p.m AS meter_id, subject, seq, p.v AS v"
        f" FROM (SELECT subject, seq, unnest([{parts}]) AS p FROM _values)) u"
        f" WHERE v IS NOT NULL AND {_AFTER_RESET} GROUP BY meter_id, subject",
        ids,
    )


def _ledger_uniques(meters: list[tuple[int, MeterRow]]) -> tuple[str, list[Any]]:
    """(meter_id, subject, value), distinct, of the registered `_values` (a backfill's): only
    the events after their customer's latest reset."""
    parts, ids = _value_parts(meters)
    return (
        "SELECT DISTINCT meter_id::VARCHAR AS meter_id, subject, value FROM"  # noqa: S608 - fixed text, values bound
        " (SELECT p.m AS meter_id, subject, seq, p.v AS value FROM"
        f" (SELECT subject, seq, unnest([{parts}]) AS p FROM _values)) u"
        f" WHERE value IS NOT NULL AND {_AFTER_RESET}",
        ids,
    )


def _live_ledger(
    values: pa.Table, numbers: list[tuple[int, MeterRow]], uniques: list[tuple[int, MeterRow]]
) -> tuple[pa.Table, pa.Table]:
    """`_ledger_numbers` and `_ledger_uniques` of live ingest, whose events all come after any
    reset: one hash aggregation of `values` in Arrow (a third of the two statements' time)."""
    parts = []
    if numbers:
        columns = [f"v{i}" for i, _ in numbers]
        grouped = values.group_by("subject", use_threads=False).aggregate(
            [(c, f) for c in columns for f in ("count", "sum", "min", "max")]
        )
        for (_, meter), column in zip(numbers, columns, strict=True):
            events = grouped.column(f"{column}_count")
            part = pa.table(
                {
                    "meter_id": pa.array([meter.id] * grouped.num_rows, pa.string()),
                    "subject": grouped.column("subject"),
                    "events": events,
                    "total": grouped.column(f"{column}_sum"),
                    "low": grouped.column(f"{column}_min"),
                    "high": grouped.column(f"{column}_max"),
                }
            )
            parts.append(part.filter(pc.greater(events, pa.scalar(0))))
    distinct = []
    for i, meter in uniques:
        column = f"v{i}"
        pairs = (
            values.select(["subject", column])
            .filter(pc.is_valid(values.column(column)))
            .group_by(["subject", column], use_threads=False)
            .aggregate([])
        )
        distinct.append(
            pa.table(
                {
                    "meter_id": pa.array([meter.id] * pairs.num_rows, pa.string()),
                    "subject": pairs.column("subject"),
                    "value": pairs.column(column),
                }
            )
        )
    return (
        pa.concat_tables(parts) if parts else _EMPTY_NUMBERS,
        pa.concat_tables(distinct) if distinct else _EMPTY_VALUES,
    )


_NUMBER_FIELDS: list[pa.Field[Any]] = [
    pa.field("meter_id", pa.string()),
    pa.field("subject", pa.string()),
    pa.field("events", pa.int64()),
    pa.field("total", pa.float64()),
    pa.field("low", pa.float64()),
    pa.field("high", pa.float64()),
]
_EMPTY_NUMBERS = pa.schema(_NUMBER_FIELDS).empty_table()
_EMPTY_VALUES = pa.schema(
    [
        pa.field("meter_id", pa.string()),
        pa.field("subject", pa.string()),
        pa.field("value", pa.string()),
    ]
).empty_table()


# The subjects a reset has closed, with the seq of that reset.
RESETS = (
    "SELECT cm.meter_id, s.subject, cm.reset_seq FROM customer_meters cm"  # noqa: S608 - fixed text, values bound
    " JOIN customers c ON c.id = cm.customer_id,"
    f" unnest({subjects.of_customer_sql('c')}) s(subject)"
    " WHERE cm.reset_seq > 0 AND s.subject IS NOT NULL"
)
_AFTER_RESET = (
    f"u.seq > coalesce((SELECT max(r.reset_seq) FROM ({RESETS}) r"  # noqa: S608 - fixed text, values bound
    " WHERE r.meter_id = u.meter_id AND r.subject = u.subject), 0)"
)


_KEYS = ("subject", "bucket", "seq")


def _values(
    meters: Sequence[MeterRow], source: str, where: str, params: list[Any], *, first: int = 0
) -> tuple[str, list[Any]]:
    """A query of (subject, bucket, seq, v0 .. vN): vI is meter I's contribution of the event, NULL
    when the event is not in the meter (its filter, or the aggregation's implicit one). The
    columns are numbered from `first` (a chunk of a longer list of meters)."""
    extracted = Extracted()
    columns: list[str] = []
    columns_params: list[Any] = []
    for i, meter in enumerate(meters):
        in_filter, in_filter_params = filter_sql(meter.filter, extracted)
        value, value_params = contribution_sql(meter.aggregation, extracted)
        columns.append(f"CASE WHEN {in_filter} THEN {value} END AS v{first + i}")
        columns_params += [*in_filter_params, *value_params]
    projection, projection_params = extracted.projection()
    # Each step MATERIALIZED: otherwise DuckDB inlines the projections and evaluates the JSON
    # parse, and each facet, once per use.
    return (
        f"WITH r AS MATERIALIZED (SELECT {subjects.OF_EVENT} AS subject, {BUCKET} AS bucket,"  # noqa: S608 - fixed text, values bound
        f" seq, name, source, timestamp, {projection} FROM {source} WHERE {where}),"
        f" f AS MATERIALIZED (SELECT *, {extracted.facets()} FROM r),"
        f" e AS MATERIALIZED (SELECT subject, bucket, seq, {', '.join(columns)} FROM f)"
        " SELECT * FROM e",
        [*projection_params, *params, *columns_params],
    )
