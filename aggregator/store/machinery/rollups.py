"""Rollups: each meter's mergeable partial aggregates, kept current by ingest and backfill.

Per (meter, customer reference, 15-minute UTC bucket): the number of events in the meter, the
sum, min and max of their contributions (count: 1 each); for unique meters, the set of
distinct values; for the meters whose result depends on when events happened, points (instant,
value): a latest meter's greatest point, every point of an integral meter (of several at one
instant, the greatest value counts). Each merges across batches and arrival orders: sets
unite, and the greatest of greatest points is the greatest point. Any interval in any timezone
is a union of buckets, so quantities merge rows instead of rescanning events. Deltas are
appended; readers read the `all_*` views (the keyed tables and their deltas, see `compaction`).

Applying events is two steps. `evaluate` computes every meter's contribution of every event
(`MeterPlan`: each distinct clause and contribution once, in one statement per
`COLUMNS_PER_STATEMENT` of them, each metadata document parsed once for every path the meters
use; each meter then a numpy gather), and from them the ledger's usage per customer reference
(which the in-memory balances take at once). Ingest evaluates a request's events before the writer takes
them (`prepare`; the writer checks that the meters are still those, `Prepared.columns_for`), so
that an organization's many meters cost the group commit that every organization waits for no
more than its few values. `store` appends a list of evaluated batches' partial aggregates to
the delta tables, grouped across the batches: ingest stores them when the events are flushed,
backfill at once. Past the evaluation, contributions travel as rows (`_long`: meter, customer
reference, bucket, value), so that no statement's text grows with the number of meters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base import subjects
from aggregator.store.base.arrays import encoded, numpy
from aggregator.store.base.meter_plan import MeterPlan
from aggregator.store.base.meter_sql import SQL
from aggregator.store.base.rows import registered
from meters.aggregations import IntegralAggregation, UniqueAggregation

if TYPE_CHECKING:
    from aggregator.store.base.meter_rows import MeterRow

# Rollups sum events per 15 minutes: quantities read whole buckets from them, the rest from events.
BUCKET_MINUTES = 15
BUCKET_US = BUCKET_MINUTES * 60 * 1_000_000
BUCKET = f"time_bucket(INTERVAL {BUCKET_MINUTES} MINUTE, timestamp)"

# Columns (distinct clauses and contributions: `MeterPlan`) per evaluating statement: DuckDB
# dies (SIGFPE) on one statement of some thousands of expressions (5,000 meters' did), and a
# statement's planning time grows with its columns.
COLUMNS_PER_STATEMENT = 500


@dataclass(frozen=True, slots=True)
class Evaluated:
    """One batch's contributions to one organization's `meters`, evaluated at `at_us`.

    `values`: (subject, bucket, seq, at_us, v0 .. vN), vI meter I's contribution of the event
    (NULL: not in the meter). `ledger`: per number meter and customer reference, (meter_id,
    subject, events, total, low, high) of the events the ledger counts; `ledger_values`: per
    unique meter, (meter_id, subject, value); `ledger_points`: per latest meter, (meter_id,
    subject, at_us, value), the greatest point."""

    organization_id: str
    meters: tuple[MeterRow, ...]
    values: pa.Table
    ledger: pa.Table
    ledger_values: pa.Table
    ledger_points: pa.Table
    at_us: int

    @classmethod
    def of(
        cls,
        meters: Sequence[MeterRow],
        values: pa.Table,
        ledger: tuple[pa.Table, pa.Table, pa.Table],
        at_us: int,
    ) -> Evaluated:
        organization_id = meters[0].organization_id if meters else ""
        return cls(organization_id, tuple(meters), values, *ledger, at_us)


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
    if not backfill:
        return evaluated(meters, values, at_us=at_us, ledger=ledger)
    numbers = _of(meters, _LEDGER_NUMBERS) if ledger else []
    uniques = _of(meters, ("unique",)) if ledger else []
    latest = _of(meters, ("latest",)) if ledger else []
    with registered(con, "_values", values):
        usage = _table(con, *_ledger_numbers(numbers)) if numbers else _EMPTY_NUMBERS
        usage_values = _table(con, *_ledger_uniques(uniques)) if uniques else _EMPTY_VALUES
        points = _table(con, *_ledger_points(latest)) if latest else _EMPTY_POINTS
    return Evaluated.of(meters, values, (usage, usage_values, points), at_us)


def evaluated(
    meters: Sequence[MeterRow], values: pa.Table, *, at_us: int, ledger: bool = True
) -> Evaluated:
    """Live ingest's `Evaluated` of contributions `values` already computed (`evaluate`, or
    `prepare` before the writer): the ledger's usage added, in Arrow."""
    if not ledger:
        return Evaluated.of(meters, values, (_EMPTY_NUMBERS, _EMPTY_VALUES, _EMPTY_POINTS), at_us)
    usage = _live_ledger(
        values,
        _of(meters, _LEDGER_NUMBERS),
        _of(meters, ("unique",)),
        _of(meters, ("latest",)),
    )
    return Evaluated.of(meters, values, usage, at_us)


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request's events evaluated for its organization's meters before the writer takes
    them (`prepare`), so that the cost of many meters is paid outside the group commit that
    every organization waits for. `values` is `Evaluated.values` with `seq` the event's row
    in the request; `definitions` what its columns mean."""

    definitions: tuple[tuple[str, int], ...]
    values: pa.Table

    def placed(self, seqs: npt.NDArray[np.int64]) -> Prepared:
        """The values of the rows admitted, with the seqs they took: `seqs[row]`, -1 for a
        row left out (a duplicate)."""
        taken = seqs[numpy(self.values.column("seq"), np.int64)]
        kept = taken >= 0
        values = self.values if kept.all() else self.values.filter(pa.array(kept))
        index = values.column_names.index("seq")
        return Prepared(
            self.definitions, values.set_column(index, "seq", pa.array(taken[kept], pa.int64()))
        )

    @staticmethod
    def joined(parts: Sequence[Prepared]) -> Prepared | None:
        """Placed parts of one organization's events in seq order as one, or None unless they
        were evaluated for the same meters."""
        if any(p.definitions != parts[0].definitions for p in parts):
            return None
        return Prepared(parts[0].definitions, pa.concat_tables([p.values for p in parts]))

    def columns_for(self, meters: Sequence[MeterRow]) -> pa.Table | None:
        """`values` with its columns in the order of `meters` (v0 .. vN), or None when the
        meters are not the ones it was evaluated for (one changed in between)."""
        place = {definition: i for i, definition in enumerate(self.definitions)}
        wanted = [place.get((m.id, m.version)) for m in meters]
        if len(meters) != len(place) or None in wanted:
            return None
        return pa.table(
            {
                **{key: self.values.column(key) for key in _KEYS},
                **{f"v{i}": self.values.column(f"v{j}") for i, j in enumerate(wanted)},
            }
        )


def prepare(
    con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow], events: pa.Table
) -> Prepared:
    """The events of `events` (as `Live.apply` takes them, but without seqs) of the meters'
    organization evaluated for `meters`, each event's `seq` its row in `events`."""
    rows = events.append_column("seq", pa.array(np.arange(events.num_rows, dtype=np.int64)))
    with registered(con, "_prepared", rows):
        values = _evaluated(
            con, meters, "_prepared", "organization_id = ?", [meters[0].organization_id]
        )
    return Prepared(tuple((m.id, m.version) for m in meters), values)


def _evaluated(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
) -> pa.Table:
    """`_values` of every meter: the statement of their plan (`plan_of`), cut every
    `COLUMNS_PER_STATEMENT` columns (each part ordered by seq, so that their rows line up),
    then each meter's column made from its filter's and its contribution's."""
    plan = plan_of(meters)
    parts = []
    for first in range(0, max(1, len(plan.columns)), COLUMNS_PER_STATEMENT):
        cut = plan.columns[first : first + COLUMNS_PER_STATEMENT]
        whole = len(cut) == len(plan.columns)
        query, query_params = _values(plan, cut, source, where, params)
        parts.append(_table(con, query if whole else query + " ORDER BY seq", query_params))
    columns = [c for p in parts for c in p.columns[len(_KEYS) :]]
    values = plan.values(columns)
    return pa.Table.from_arrays(
        [*parts[0].columns[: len(_KEYS)], *values],
        [*_KEYS, *(f"v{i}" for i in range(len(values)))],
    )


def plan_of(meters: Sequence[MeterRow]) -> MeterPlan:
    """The plan of `meters` (`MeterPlan`), made once per list of meter definitions: a meter's
    definition changes only with its version."""
    return _plan(_Definitions(tuple((m.id, m.version) for m in meters), meters))


@dataclass(frozen=True, slots=True, eq=False)
class _Definitions:
    """Meters, equal to another list of the same meters at the same versions."""

    key: tuple[tuple[str, int], ...]
    meters: Sequence[MeterRow]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Definitions) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


# A plan per organization whose meters are evaluated (and a few more: probes, backfills).
@functools.lru_cache(maxsize=256)
def _plan(definitions: _Definitions) -> MeterPlan:
    return MeterPlan.of([(m.filter, m.aggregation) for m in definitions.meters])


def _table(con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None) -> pa.Table:
    table: pa.Table = con.sql(query, params=params).to_arrow_table()
    return table


def store(con: duckdb.DuckDBPyConnection, batches: Sequence[Evaluated]) -> None:
    """Append the batches' partial aggregates to the rollup and ledger deltas, merged across
    batches: each (meter, customer reference, bucket) once, however many batches had it.

    The contributions are turned into rows (meter, customer reference, bucket, value) first, so
    that each statement's text is the same whatever the meters: its cost grows with the values
    stored, not with how many meters an organization defines."""
    numbers = [_long(b.values, _of(b.meters, ("number",)), _ROLLUP_KEYS) for b in batches]
    _append(
        con,
        numbers,
        "_rollup_numbers",
        "INSERT INTO rollup_deltas SELECT meter_id::UUID, subject, bucket, count(*), sum(v),"
        " min(v), max(v) FROM _rollup_numbers GROUP BY meter_id, subject, bucket",
    )
    uniques = [_long(b.values, _of(b.meters, ("unique",)), _ROLLUP_KEYS) for b in batches]
    _append(
        con,
        uniques,
        "_rollup_values",
        "INSERT INTO rollup_value_deltas"
        " SELECT DISTINCT meter_id::UUID, subject, bucket, v FROM _rollup_values",
    )
    _store_points(con, batches)
    _append(
        con,
        [_timed(b.ledger, b.at_us) for b in batches],
        "_ledger",
        "INSERT INTO ledger_usage_deltas SELECT meter_id::UUID, subject, sum(events), sum(total),"
        " min(low), max(high), make_timestamptz(min(at_us)), make_timestamptz(max(at_us))"
        " FROM _ledger GROUP BY ALL",
    )
    _append(
        con,
        [b.ledger_values for b in batches],
        "_ledger_values",
        "INSERT INTO ledger_usage_value_deltas"
        " SELECT DISTINCT meter_id::UUID, subject, value FROM _ledger_values",
    )


def _append(
    con: duckdb.DuckDBPyConnection, tables: list[pa.Table], name: str, statement: str
) -> None:
    """Run `statement` over the rows of `tables`, registered together as `name`, if any."""
    rows = [t for t in tables if t.num_rows]
    if rows:
        with registered(con, name, pa.concat_tables(rows)):
            con.execute(statement)


def _store_points(con: duckdb.DuckDBPyConnection, batches: Sequence[Evaluated]) -> None:
    """The points of latest meters (each bucket's greatest) and integral meters (each event's:
    several at one instant are merged where they are read), and the ledger's latest points,
    appended to their deltas. Each batch's columns are read with a statement per meter: for a
    few such meters, cheaper than turning the contributions into rows (`_long`)."""
    for batch in batches:
        latest, every = _of(batch.meters, ("latest",)), _of(batch.meters, ("integral",))
        if not latest and not every:
            continue
        with registered(con, "_values", batch.values):
            for i, meter in latest:
                con.execute(
                    "INSERT INTO rollup_point_deltas SELECT ?::UUID, subject, bucket, p.at_us,"  # noqa: S608 - fixed text, values bound
                    " p.value FROM (SELECT subject, bucket,"
                    f" max({{'at_us': at_us, 'value': v{i}}}) AS p FROM _values"
                    f" WHERE v{i} IS NOT NULL GROUP BY ALL)",
                    [meter.id],
                )
            for i, meter in every:
                con.execute(
                    "INSERT INTO rollup_point_deltas SELECT ?::UUID, subject, bucket, at_us,"  # noqa: S608 - fixed text, values bound
                    f" v{i} FROM _values WHERE v{i} IS NOT NULL",
                    [meter.id],
                )
    # As they come: compaction and readers take each subject's greatest.
    _append(
        con,
        [b.ledger_points for b in batches],
        "_ledger_points",
        "INSERT INTO ledger_point_deltas"
        " SELECT meter_id::UUID, subject, at_us, value FROM _ledger_points",
    )


_ROLLUP_KEYS = ("subject", "bucket")
_LEDGER_KEYS = ("subject",)
# The ledger's events, totals and extremes: an integral meter has no ledger (its consumption
# would grow between events, where every other balance changes only with a write).
_LEDGER_NUMBERS = ("number", "latest")


def kind(meter: MeterRow) -> str:
    """How a meter's contributions are kept: 'unique' (value sets), 'latest' and 'integral'
    (points), or 'number' (events, sum, min, max)."""
    aggregation = meter.aggregation
    if isinstance(aggregation, UniqueAggregation):
        return "unique"
    if isinstance(aggregation, IntegralAggregation):
        return "integral"
    return "latest" if aggregation.func == "latest" else "number"


def _of(meters: Sequence[MeterRow], kinds: tuple[str, ...]) -> list[tuple[int, MeterRow]]:
    return [(i, m) for i, m in enumerate(meters) if kind(m) in kinds]


def _long(values: pa.Table, meters: list[tuple[int, MeterRow]], keys: Sequence[str]) -> pa.Table:
    """The contributions of `values` to `meters` (all numbers or all uniques) as rows: the
    `keys` columns, `meter_id` (a dictionary over the meters' ids) and `v`, one row per event
    and meter the event is in, in the order of the meters, then of `values`."""
    n = values.num_rows
    unique = bool(meters) and kind(meters[0][1]) == "unique"
    if not meters or not n:
        return _long_schema(keys, unique=unique).empty_table()
    type_ = pa.string() if unique else pa.float64()
    contributions = pa.concat_arrays(
        [values.column(f"v{i}").combine_chunks().cast(type_) for i, _ in meters]
    )
    present = numpy(pc.is_valid(contributions), np.bool_)
    rows = np.tile(np.arange(n, dtype=np.int64), len(meters))[present]
    which = np.repeat(np.arange(len(meters), dtype=np.int32), n)[present]
    ids = pa.DictionaryArray.from_arrays(
        pa.array(which, pa.int32()), pa.array([m.id for _, m in meters], pa.string())
    )
    columns = values.select(list(keys)).take(pa.array(rows))
    return columns.append_column("meter_id", ids).append_column(
        "v", contributions.filter(pa.array(present))
    )


def _long_schema(keys: Sequence[str], *, unique: bool) -> pa.Schema:
    types = {"subject": pa.string(), "bucket": pa.timestamp("us", tz="UTC")}
    return pa.schema(
        [
            *(pa.field(k, types[k]) for k in keys),
            pa.field("meter_id", pa.dictionary(pa.int32(), pa.string())),
            pa.field("v", pa.string() if unique else pa.float64()),
        ]
    )


def _timed(table: pa.Table, at_us: int) -> pa.Table:
    return table.append_column("at_us", pa.array(np.full(table.num_rows, at_us, np.int64)))


def _value_parts(meters: list[tuple[int, MeterRow]]) -> tuple[str, list[Any]]:
    return ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i, _ in meters), [m.id for _, m in meters]


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


def _ledger_points(meters: list[tuple[int, MeterRow]]) -> tuple[str, list[Any]]:
    """(meter_id, subject, at_us, value), the greatest point, of the registered `_values` (a
    backfill's): only the events after their customer's latest reset."""
    parts, ids = _value_parts(meters)
    return (
        "SELECT meter_id::VARCHAR AS meter_id, subject, p.at_us AS at_us, p.value AS value FROM"  # noqa: S608 - fixed text, values bound
        " (SELECT meter_id, subject, max({'at_us': at_us, 'value': v}) AS p FROM"
        " (SELECT p.m AS meter_id, subject, seq, at_us, p.v AS v FROM"
        f" (SELECT subject, seq, at_us, unnest([{parts}]) AS p FROM _values)) u"
        f" WHERE v IS NOT NULL AND {_AFTER_RESET} GROUP BY ALL)",
        ids,
    )


def _live_points(values: pa.Table, latest: list[tuple[int, MeterRow]]) -> pa.Table:
    """`_ledger_points` of live ingest: each latest meter's greatest point per subject (sorted
    by subject, instant and value, the last of each subject's run)."""
    if not latest or not values.num_rows:
        return _EMPTY_POINTS
    _, codes = encoded(values.column("subject"))
    at = numpy(values.column("at_us"), np.int64)
    parts = []
    for i, meter in latest:
        column = values.column(f"v{i}")
        rows = np.flatnonzero(numpy(pc.is_valid(column), np.bool_))
        value = numpy(column, np.float64)[rows]  # nulls are NaN, and not in `rows`
        order = np.lexsort((value, at[rows], codes[rows]))
        ends = codes[rows][order]
        last = np.append(ends[1:] != ends[:-1], True) if len(ends) else ends.astype(bool)
        picked = rows[order][last]
        parts.append(
            pa.table(
                {
                    "meter_id": pa.array([meter.id] * len(picked), pa.string()),
                    "subject": values.column("subject").take(pa.array(picked)),
                    "at_us": pa.array(at[picked], pa.int64()),
                    "value": pa.array(value[order][last], pa.float64()),
                },
                schema=_EMPTY_POINTS.schema,
            )
        )
    return pa.concat_tables(parts)


def _live_ledger(
    values: pa.Table,
    numbers: list[tuple[int, MeterRow]],
    uniques: list[tuple[int, MeterRow]],
    latest: list[tuple[int, MeterRow]],
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """`_ledger_numbers` and `_ledger_uniques` of live ingest, whose events all come after any
    reset: one hash aggregation each, in Arrow."""
    usage = _EMPTY_NUMBERS
    if 0 < len(numbers) <= WIDE_METERS:
        usage = _wide_usage(values, numbers)
    elif numbers:
        grouped = (
            _long(values, numbers, _LEDGER_KEYS)
            .group_by(["meter_id", "subject"], use_threads=False)
            .aggregate([("v", "count"), ("v", "sum"), ("v", "min"), ("v", "max")])
        )
        usage = pa.table(
            {
                "meter_id": grouped.column("meter_id").cast(pa.string()),
                "subject": grouped.column("subject"),
                "events": grouped.column("v_count"),
                "total": grouped.column("v_sum"),
                "low": grouped.column("v_min"),
                "high": grouped.column("v_max"),
            },
            schema=_EMPTY_NUMBERS.schema,
        )
    distinct = _EMPTY_VALUES
    if uniques:
        pairs = (
            _long(values, uniques, _LEDGER_KEYS)
            .group_by(["meter_id", "subject", "v"], use_threads=False)
            .aggregate([])
        )
        distinct = pa.table(
            {
                "meter_id": pairs.column("meter_id").cast(pa.string()),
                "subject": pairs.column("subject"),
                "value": pairs.column("v"),
            },
            schema=_EMPTY_VALUES.schema,
        )
    return usage, distinct, _live_points(values, latest)


# Up to this many number meters, the ledger's usage is aggregated over the batch's rows, four
# aggregates a meter (half the time of aggregating the contributions as rows at 10 meters);
# past it, over the contributions as rows, whose cost does not grow with the meters' columns
# (a fifth of the time at 200 meters).
WIDE_METERS = 32


def _wide_usage(values: pa.Table, numbers: list[tuple[int, MeterRow]]) -> pa.Table:
    """`_live_ledger`'s usage of a few number meters: one aggregation of `values` by subject."""
    columns = [f"v{i}" for i, _ in numbers]
    grouped = values.group_by("subject", use_threads=False).aggregate(
        [(c, f) for c in columns for f in ("count", "sum", "min", "max")]
    )
    parts = []
    for (_, meter), column in zip(numbers, columns, strict=True):
        events = grouped.column(f"{column}_count")
        part = pa.table(
            {
                "meter_id": pa.array([meter.id] * grouped.num_rows, pa.string()),
                "subject": grouped.column("subject"),
                "events": events,
                "total": grouped.column(f"{column}_sum").cast(pa.float64()),
                "low": grouped.column(f"{column}_min").cast(pa.float64()),
                "high": grouped.column(f"{column}_max").cast(pa.float64()),
            },
            schema=_EMPTY_NUMBERS.schema,
        )
        parts.append(part.filter(pc.greater(events, pa.scalar(0))))
    return pa.concat_tables(parts)


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
_POINT_FIELDS: list[pa.Field[Any]] = [
    pa.field("meter_id", pa.string()),
    pa.field("subject", pa.string()),
    pa.field("at_us", pa.int64()),
    pa.field("value", pa.float64()),
]
_EMPTY_POINTS = pa.schema(_POINT_FIELDS).empty_table()


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


_KEYS = ("subject", "bucket", "seq", "at_us")


def _values(
    plan: MeterPlan, columns: Sequence[SQL], source: str, where: str, params: list[Any]
) -> tuple[str, list[Any]]:
    """A query of (subject, bucket, seq, at_us, `columns` of `plan`)."""
    projection, projection_params = plan.extracted.projection()
    listed = ", ".join(f"{text} AS _c{i}" for i, (text, _) in enumerate(columns)) or "NULL AS _c"
    # Each step MATERIALIZED: otherwise DuckDB inlines the projections and evaluates the JSON
    # parse, and each facet, once per use.
    return (
        f"WITH r AS MATERIALIZED (SELECT {subjects.OF_EVENT} AS subject, {BUCKET} AS bucket,"  # noqa: S608 - fixed text, values bound
        f" seq, name, source, timestamp, epoch_us(timestamp) AS at_us, {projection}"
        f" FROM {source} WHERE {where}),"
        f" f AS MATERIALIZED (SELECT *, {plan.extracted.facets()} FROM r),"
        f" e AS MATERIALIZED (SELECT subject, bucket, seq, at_us, {listed} FROM f)"
        " SELECT * FROM e",
        [*projection_params, *params, *(p for _, ps in columns for p in ps)],
    )
