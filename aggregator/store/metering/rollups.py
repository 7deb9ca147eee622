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
use), kept per distinct filter and contribution (`Contributions`), and from them the ledger's
usage per customer reference (which the in-memory balances take at once). Ingest evaluates a
request's events before the writer takes them (`prepare`; the writer checks that the meters are
still those, `Prepared.columns_for`), so that an organization's many meters cost the group
commit that every organization waits for no more than its few values. The partial aggregates of
a list of evaluated batches, grouped across them, are `partials`'; `store_ledger` appends their
ledger usage to the delta tables. Past the evaluation, contributions
travel as rows (`long_rows`: meter, customer reference, bucket, value, one numpy gather for all
meters), so that neither a statement's text nor Python's work grows with the number of meters.
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
from aggregator.store.base.rows import registered
from aggregator.store.metering.meter_plan import Contributions, MeterPlan
from aggregator.store.metering.meter_sql import SQL
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

    `keys`: (subject, bucket, seq, at_us) of each event; `contributions`: each meter's
    contribution of each event (`Contributions`; `values` gives them as columns). `ledger`: per
    number meter and customer reference, (meter_id, subject, events, total, low, high) of the
    events the ledger counts; `ledger_values`: per unique meter, (meter_id, subject, value);
    `ledger_points`: per latest meter, (meter_id, subject, at_us, value), the greatest point."""

    organization_id: str
    meters: tuple[MeterRow, ...]
    keys: pa.Table
    contributions: Contributions
    ledger: pa.Table
    ledger_values: pa.Table
    ledger_points: pa.Table
    at_us: int

    @classmethod
    def of(
        cls,
        meters: Sequence[MeterRow],
        evaluated: tuple[pa.Table, Contributions],
        ledger: tuple[pa.Table, pa.Table, pa.Table],
        at_us: int,
    ) -> Evaluated:
        organization_id = meters[0].organization_id if meters else ""
        return cls(organization_id, tuple(meters), *evaluated, *ledger, at_us)

    def values(self, meters: Sequence[int] | None = None) -> pa.Table:
        """(subject, bucket, seq, at_us, vI ..): vI meter I's contribution of the event (NULL:
        not in the meter), for the meters at `meters` (every meter: None)."""
        return _columns(self.keys, self.contributions, meters)


def _columns(
    keys: pa.Table, contributions: Contributions, meters: Sequence[int] | None
) -> pa.Table:
    chosen = range(len(contributions.filters)) if meters is None else meters
    return pa.Table.from_arrays(
        [*keys.columns, *(contributions.column(i) for i in chosen)],
        [*keys.column_names, *(f"v{i}" for i in chosen)],
    )


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
    keys, contributions = _evaluated(con, meters, source, where, params)
    if not backfill:
        return evaluated(meters, keys, contributions, at_us=at_us, ledger=ledger)
    numbers = of_kind(meters, _LEDGER_NUMBERS) if ledger else []
    uniques = of_kind(meters, ("unique",)) if ledger else []
    latest = of_kind(meters, ("latest",)) if ledger else []
    with registered(con, "_values", _columns(keys, contributions, None)):
        usage = arrow_table(con, *_ledger_numbers(numbers)) if numbers else _EMPTY_NUMBERS
        usage_values = (
            arrow_table(con, *_ledger_uniques(uniques)) if uniques else EMPTY_LEDGER_VALUES
        )
        points = arrow_table(con, *_ledger_points(latest)) if latest else EMPTY_LEDGER_POINTS
    return Evaluated.of(meters, (keys, contributions), (usage, usage_values, points), at_us)


def evaluated(
    meters: Sequence[MeterRow],
    keys: pa.Table,
    contributions: Contributions,
    *,
    at_us: int,
    ledger: bool = True,
) -> Evaluated:
    """Live ingest's `Evaluated` of contributions already computed (`evaluate`, or `prepare`
    before the writer): the ledger's usage added, in Arrow."""
    both = (keys, contributions)
    if not ledger:
        return Evaluated.of(
            meters, both, (_EMPTY_NUMBERS, EMPTY_LEDGER_VALUES, EMPTY_LEDGER_POINTS), at_us
        )
    usage = _live_ledger(keys, contributions, meters)
    return Evaluated.of(meters, both, usage, at_us)


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request's events evaluated for its organization's meters before the writer takes
    them (`prepare`), so that the cost of many meters is paid outside the group commit that
    every organization waits for. `keys` and `contributions` are `Evaluated`'s, with `seq`
    the event's row in the request; `meters` the meters they were evaluated for."""

    meters: Sequence[MeterRow]
    keys: pa.Table
    contributions: Contributions

    def same_meters(self, meters: Sequence[MeterRow]) -> bool:
        """Whether `meters` are those evaluated: the same list (the store's, while no meter
        changes), or the same meters at the same versions in the same order."""
        return meters is self.meters or _definitions(meters) == _definitions(self.meters)

    def placed(self, seqs: npt.NDArray[np.int64]) -> Prepared:
        """The values of the rows admitted, with the seqs they took: `seqs[row]`, -1 for a
        row left out (a duplicate)."""
        taken = seqs[numpy(self.keys.column("seq"), np.int64)]
        kept = taken >= 0
        keys, contributions = self.keys, self.contributions
        if not kept.all():
            keys = keys.filter(pa.array(kept))
            contributions = contributions.taken(np.flatnonzero(kept))
        index = keys.column_names.index("seq")
        keys = keys.set_column(index, "seq", pa.array(taken[kept], pa.int64()))
        return Prepared(self.meters, keys, contributions)

    @staticmethod
    def joined(parts: Sequence[Prepared]) -> Prepared | None:
        """Placed parts of one organization's events in seq order as one, or None unless they
        were evaluated for the same meters."""
        if not all(p.same_meters(parts[0].meters) for p in parts):
            return None
        return Prepared(
            parts[0].meters,
            pa.concat_tables([p.keys for p in parts]),
            Contributions.joined([p.contributions for p in parts]),
        )

    def columns_for(self, meters: Sequence[MeterRow]) -> tuple[pa.Table, Contributions] | None:
        """`keys` and `contributions` with the meters in the order of `meters`, or None when
        the meters are not the ones they were evaluated for (one changed in between)."""
        if self.same_meters(meters):
            return self.keys, self.contributions
        place = {definition: i for i, definition in enumerate(_definitions(self.meters))}
        wanted = [place.get((m.id, m.version)) for m in meters]
        if len(meters) != len(place) or None in wanted:
            return None
        return self.keys, self.contributions.reordered(np.array(wanted, np.intp))


def prepare(
    con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow], events: pa.Table
) -> Prepared:
    """The events of `events` (as `Live.apply` takes them, but without seqs) of the meters'
    organization evaluated for `meters`, each event's `seq` its row in `events`."""
    rows = events.append_column("seq", pa.array(np.arange(events.num_rows, dtype=np.int64)))
    with registered(con, "_prepared", rows):
        keys, contributions = _evaluated(
            con, meters, "_prepared", "organization_id = ?", [meters[0].organization_id]
        )
    return Prepared(meters, keys, contributions)


def _evaluated(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
) -> tuple[pa.Table, Contributions]:
    """(subject, bucket, seq, at_us) of the events and every meter's contributions of them:
    the statement of their plan (`MeterPlan`), cut every `COLUMNS_PER_STATEMENT` columns
    (each part ordered by seq, so that their rows line up)."""
    plan = meter_kinds(meters).plan
    dimensions = [f"_d{i}" for i in range(len(plan.dimensions))]
    parts = []
    for first in range(0, max(1, len(plan.columns)), COLUMNS_PER_STATEMENT):
        cut = plan.columns[first : first + COLUMNS_PER_STATEMENT]
        whole = len(cut) == len(plan.columns)
        query, query_params = values_query(
            plan, cut, source, where, params, with_dimensions=not first
        )
        parts.append(arrow_table(con, query if whole else query + " ORDER BY seq", query_params))
    columns = [
        c
        for i, p in enumerate(parts)
        for c in p.columns[len(_KEYS) + (0 if i else len(dimensions)) :]
    ]
    return parts[0].select([*_KEYS, *dimensions]), plan.evaluated(columns)


def _definitions(meters: Sequence[MeterRow]) -> tuple[tuple[str, int], ...]:
    """What meters mean: a meter's definition changes only with its version."""
    return tuple((m.id, m.version) for m in meters)


@dataclass(frozen=True, slots=True)
class _Kinds:
    """A list of meters as evaluating them needs it, made once per list of definitions: their
    plan, their ids, and the positions of the meters of each kind (`kind`)."""

    plan: MeterPlan
    ids: pa.Array[Any]
    kinds: npt.NDArray[Any]  # each meter's `kind`
    numbers: npt.NDArray[np.intp]  # the ledger's: number and latest meters
    rollups: npt.NDArray[np.intp]  # number meters
    uniques: npt.NDArray[np.intp]
    # Number meters with dimensions, and per meter the columns of its dimensions' values
    # (`_d<i>` of `keys`, in the meter's order; `len(dimensions)`: none), three each.
    grouped: npt.NDArray[np.intp]
    dimension_columns: npt.NDArray[np.intp]
    dimensions: tuple[str, ...]  # `_d<i>`'s dimension, each distinct one once


def meter_kinds(meters: Sequence[MeterRow]) -> _Kinds:
    return _kinds_of_list(_Same(meters))


@dataclass(frozen=True, slots=True, eq=False)
class _Same:
    """A list of meters, equal only to itself: the store's list of an organization's meters is
    replaced, never changed, when one changes (`Meters`), and a batch keeps it as it was."""

    meters: Sequence[MeterRow]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.meters is self.meters

    def __hash__(self) -> int:
        return id(self.meters)


# Per list object, so that a batch reads its meters' kinds without a step per meter; an entry
# holds its list, so no other list can take its identity meanwhile. Few: a list read again
# after a change replaces one (a miss costs a step per meter, ~2 ms at 5,000).
@functools.lru_cache(maxsize=32)
def _kinds_of_list(same: _Same) -> _Kinds:
    meters = same.meters
    # The parsed definitions themselves in the key, by identity: a meter's id and version name
    # its definition in one store, not in every store a process opens (tests reuse ids). The
    # cached entry holds them, so no other object can take their identities meanwhile.
    key = tuple((m.id, m.version, id(m.filter), id(m.aggregation)) for m in meters)
    return _kinds_of(_Definitions(key, meters))


@dataclass(frozen=True, slots=True, eq=False)
class _Definitions:
    """Meters, equal to another list of the same meters with the same definitions."""

    key: tuple[tuple[str, int, int, int], ...]
    meters: Sequence[MeterRow]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Definitions) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


# One per organization whose meters are evaluated (and a few more: probes, backfills); a miss
# compiles the plan again (~0.2 s at 5,000 meters, ~1 ms at 20).
@functools.lru_cache(maxsize=64)
def _kinds_of(definitions: _Definitions) -> _Kinds:
    meters = definitions.meters
    kinds = np.array([kind(m) for m in meters], dtype=object)
    grouped = [i for i, m in enumerate(meters) if m.dimensions and kinds[i] == "number"]
    dimensions = tuple(dict.fromkeys(d for i in grouped for d in meters[i].dimensions))
    none = len(dimensions)
    columns = [
        [dimensions.index(d) for d in meters[i].dimensions]
        + [none] * (3 - len(meters[i].dimensions))
        for i in grouped
    ]
    return _Kinds(
        MeterPlan.of([(m.filter, m.aggregation) for m in meters], dimensions),
        pa.array([m.id for m in meters], pa.string()),
        kinds,
        np.flatnonzero(np.isin(kinds, _LEDGER_NUMBERS)),
        np.flatnonzero(kinds == "number"),
        np.flatnonzero(kinds == "unique"),
        np.array(grouped, np.intp),
        np.array(columns, np.intp).reshape(len(grouped), 3),
        dimensions,
    )


def arrow_table(con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None) -> pa.Table:
    table: pa.Table = con.sql(query, params=params).to_arrow_table()
    return table


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


def of_kind(meters: Sequence[MeterRow], kinds: tuple[str, ...]) -> list[tuple[int, MeterRow]]:
    positions = np.flatnonzero(np.isin(meter_kinds(meters).kinds, kinds))
    return [(i, meters[i]) for i in positions.tolist()]


def long_rows(
    keys: pa.Table,
    contributions: Contributions,
    meters: npt.NDArray[np.intp],
    ids: pa.Array[Any],
    columns: Sequence[str],
) -> pa.Table:
    """The contributions to the meters at `meters` (positions; all numbers or all uniques;
    `ids` every meter's id) as rows: the `columns` of `keys`, `meter_id` (a dictionary over the
    meters' ids) and `v`, one row per event and meter the event is in, in the order of the
    meters, then of the events."""
    n = keys.num_rows
    unique = bool(len(meters)) and contributions.text[int(contributions.contributions[meters[0]])]
    if not len(meters) or not n:
        return _long_schema(columns, unique=unique).empty_table()
    which, rows, values = contributions.long(meters)
    named = pa.DictionaryArray.from_arrays(
        pa.array(which.astype(np.int32), pa.int32()), ids.take(pa.array(meters, pa.int64()))
    )
    taken = keys.select(list(columns)).take(pa.array(rows, pa.int64()))
    return taken.append_column("meter_id", named).append_column("v", values)


def _long_schema(keys: Sequence[str], *, unique: bool) -> pa.Schema:
    types = {"subject": pa.string(), "bucket": pa.timestamp("us", tz="UTC")}
    return pa.schema(
        [
            *(pa.field(k, types[k]) for k in keys),
            pa.field("meter_id", pa.dictionary(pa.int32(), pa.string())),
            pa.field("v", pa.string() if unique else pa.float64()),
        ]
    )


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


def _live_points(
    keys: pa.Table, contributions: Contributions, latest: list[tuple[int, MeterRow]]
) -> pa.Table:
    """`_ledger_points` of live ingest: each latest meter's greatest point per subject (sorted
    by subject, instant and value, the last of each subject's run)."""
    if not latest or not keys.num_rows:
        return EMPTY_LEDGER_POINTS
    _, codes = encoded(keys.column("subject"))
    at = numpy(keys.column("at_us"), np.int64)
    parts = []
    for i, meter in latest:
        column = contributions.column(i)
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
                    "subject": keys.column("subject").take(pa.array(picked)),
                    "at_us": pa.array(at[picked], pa.int64()),
                    "value": pa.array(value[order][last], pa.float64()),
                },
                schema=EMPTY_LEDGER_POINTS.schema,
            )
        )
    return pa.concat_tables(parts)


def _live_ledger(
    keys: pa.Table, contributions: Contributions, meters: Sequence[MeterRow]
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """`_ledger_numbers` and `_ledger_uniques` of live ingest, whose events all come after any
    reset: one hash aggregation each, in Arrow."""
    kinds = meter_kinds(meters)
    numbers, uniques = kinds.numbers, kinds.uniques
    usage = _EMPTY_NUMBERS
    if 0 < len(numbers) <= WIDE_METERS:
        usage = _wide_usage(keys, contributions, numbers, kinds.ids)
    elif len(numbers):
        grouped = (
            long_rows(keys, contributions, numbers, kinds.ids, _LEDGER_KEYS)
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
    distinct = EMPTY_LEDGER_VALUES
    if len(uniques):
        pairs = (
            long_rows(keys, contributions, uniques, kinds.ids, _LEDGER_KEYS)
            .group_by(["meter_id", "subject", "v"], use_threads=False)
            .aggregate([])
        )
        distinct = pa.table(
            {
                "meter_id": pairs.column("meter_id").cast(pa.string()),
                "subject": pairs.column("subject"),
                "value": pairs.column("v"),
            },
            schema=EMPTY_LEDGER_VALUES.schema,
        )
    return usage, distinct, _live_points(keys, contributions, of_kind(meters, ("latest",)))


# Up to this many number meters, the ledger's usage is aggregated over the batch's rows, four
# aggregates a meter (half the time of aggregating the contributions as rows at 10 meters);
# past it, over the contributions as rows, whose cost does not grow with the meters' columns
# (a fifth of the time at 200 meters).
WIDE_METERS = 32


def _wide_usage(
    keys: pa.Table,
    contributions: Contributions,
    numbers: npt.NDArray[np.intp],
    ids: pa.Array[Any],
) -> pa.Table:
    """`_live_ledger`'s usage of a few number meters, per meter a pass over the rows in
    numpy (half the time of Arrow's hash aggregation of every meter's four aggregates). Sums
    are `bincount`'s, which adds each subject's values in row order, as Arrow's did: the
    same floats to the last bit."""
    subjects: Any = pc.dictionary_encode(keys.column("subject").combine_chunks())
    codes = numpy(subjects.indices, np.int64)
    groups = len(subjects.dictionary)
    inside = contributions.inside(numbers)
    values = contributions.numbers[contributions.contributions[numbers]]
    shape = (len(numbers), groups)
    events = np.empty(shape, np.int64)
    total = np.empty(shape)
    low, high = np.full(shape, np.inf), np.full(shape, -np.inf)
    for j in range(len(numbers)):
        rows, v = codes[inside[j]], values[j][inside[j]]
        events[j] = np.bincount(rows, minlength=groups)
        total[j] = np.bincount(rows, weights=v, minlength=groups)
        np.minimum.at(low[j], rows, v)
        np.maximum.at(high[j], rows, v)
    meter, group = np.nonzero(events > 0)
    return pa.table(
        {
            "meter_id": ids.take(pa.array(numbers[meter], pa.int64())),
            "subject": subjects.dictionary.take(pa.array(group, pa.int64())),
            "events": events[meter, group],
            "total": total[meter, group],
            "low": low[meter, group],
            "high": high[meter, group],
        },
        schema=_EMPTY_NUMBERS.schema,
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
# The ledger's values and points as the balances take them too (`Balances.add`).
EMPTY_LEDGER_VALUES = pa.schema(
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
EMPTY_LEDGER_POINTS = pa.schema(_POINT_FIELDS).empty_table()


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


def values_query(
    plan: MeterPlan,
    columns: Sequence[SQL],
    source: str,
    where: str,
    params: list[Any],
    *,
    with_dimensions: bool,
) -> tuple[str, list[Any]]:
    """A query of (subject, bucket, seq, at_us, `_d<i>`: the plan's dimensions' values if
    `with_dimensions`, `columns` of `plan`)."""
    projection, projection_params = plan.extracted.projection()
    named = [(f"_d{i}", sql) for i, sql in enumerate(plan.dimensions if with_dimensions else ())]
    named += [(f"_c{i}", sql) for i, sql in enumerate(columns)]
    listed = ", ".join(f"{text} AS {name}" for name, (text, _) in named) or "NULL AS _c"
    # Each step MATERIALIZED: otherwise DuckDB inlines the projections and evaluates the JSON
    # parse, and each facet, once per use.
    return (
        f"WITH r AS MATERIALIZED (SELECT {subjects.OF_EVENT} AS subject, {BUCKET} AS bucket,"  # noqa: S608 - fixed text, values bound
        f" seq, name, source, timestamp, epoch_us(timestamp) AS at_us, {projection}"
        f" FROM {source} WHERE {where}),"
        f" f AS MATERIALIZED (SELECT *, {plan.extracted.facets()} FROM r),"
        f" e AS MATERIALIZED (SELECT subject, bucket, seq, at_us, {listed} FROM f)"
        " SELECT * FROM e",
        [*projection_params, *params, *(p for _, (_, ps) in named for p in ps)],
    )
