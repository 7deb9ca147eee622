"""Quantities of a meter over periods and over an exact range, merged from partials.

Whole 15-minute buckets come from the rollups; the parts of a range that do not fill a bucket
(its edges), and any query filtering on event metadata, come from the stored events. Partials
are merged per period (and per customer when asked), then reduced by the meter's aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import duckdb

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.meter_sql import contribution_sql, filter_sql, member_pointer
from aggregator.store.machinery.rollups import BUCKET_US
from meters.aggregations import Partial, UniqueAggregation
from meters.periods import Interval, boundaries
from meters.times import datetime_to_us, us_to_datetime

__all__ = [
    "Gathered",
    "Scope",
    "compute",
    "gather",
]

# One customer however its events named it: a customer id, or the id of the customer
# with that external id, else the external id itself.
_CUSTOMER = (
    f"coalesce((SELECT {subjects.id_sql('c')} FROM customers c WHERE c.organization_id = ?::UUID"  # noqa: S608 - fixed text, values bound
    f" AND subject = {subjects.external_sql('c')}), subject)"
)
Key = tuple[int, str]  # (range index, customer or "")


@dataclass(frozen=True, slots=True)
class Scope:
    """Which events count: the meter's, of these customer subjects, with this metadata."""

    meter: MeterRow
    subjects: tuple[str, ...] | None  # None: every customer
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()
    by_customer: bool = False


def _ranges_cte(ranges: Sequence[tuple[int, int, int]]) -> tuple[str, list[Any]]:
    return (
        "(SELECT unnest(?::INTEGER[]) AS idx, make_timestamptz(unnest(?::BIGINT[])) AS lo,"
        " make_timestamptz(unnest(?::BIGINT[])) AS hi)",
        [[r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]],
    )


def _shape(scope: Scope, sums: str, value: str) -> tuple[list[Any], bool, str, str]:
    """What both readers select: (customer expression's params, unique?, the select list, the
    GROUP BY). Unique meters select distinct values, the others aggregates."""
    who, who_params = (
        (_CUSTOMER, [scope.meter.organization_id]) if scope.by_customer else ("''", [])
    )
    if isinstance(scope.meter.aggregation, UniqueAggregation):
        return who_params, True, f"DISTINCT p.idx, {who}, {value}", ""
    return who_params, False, f"p.idx, {who}, {sums}", "GROUP BY ALL"


SQL = tuple[str, list[Any]]


def from_rollups(scope: Scope, ranges: Sequence[tuple[int, int, int]]) -> SQL:
    """A query of the partials of whole buckets: `ranges` are (index, lo, hi) with lo/hi on
    bucket bounds."""
    meter = scope.meter
    cte, cte_params = _ranges_cte(ranges)
    # The ranges' span as a plain filter too: zone maps prune with it, not with the join.
    where = (
        "r.meter_id = ?::UUID"
        " AND r.bucket >= make_timestamptz(?) AND r.bucket < make_timestamptz(?)"
    )
    params: list[Any] = [meter.id, *_span(ranges)]
    if scope.subjects is not None:
        where += " AND r.subject IN (SELECT unnest(?::VARCHAR[]))"
        params.append(list(scope.subjects))
    who_params, unique, selected, group = _shape(
        scope, "sum(events), sum(total), min(low), max(high)", "value"
    )
    table = "all_rollup_values" if unique else "all_rollups"
    return (
        f"SELECT {selected} FROM {table} r JOIN {cte} p ON r.bucket >= p.lo AND r.bucket < p.hi"  # noqa: S608 - fixed text, values bound
        f" WHERE {where} {group}",
        [*who_params, *cte_params, *params],
    )


def from_events(scope: Scope, ranges: Sequence[tuple[int, int, int]]) -> SQL:
    """A query of the partials straight from stored events: `ranges` are (index, lo, hi), hi
    exclusive."""
    meter = scope.meter
    cte, cte_params = _ranges_cte(ranges)
    # The filter alone: `v IS NOT NULL` below is the aggregation's implicit filter, so each
    # event's value is computed once.
    in_filter, in_filter_params = filter_sql(meter.filter)
    value, value_params = contribution_sql(meter.aggregation)
    where = (
        "organization_id = ?::UUID AND timestamp >= make_timestamptz(?)"
        f" AND timestamp < make_timestamptz(?) AND {in_filter}"
    )
    params: list[Any] = [meter.organization_id, *_span(ranges), *in_filter_params]
    if scope.subjects is not None:
        where += f" AND {subjects.OF_EVENT} IN (SELECT unnest(?::VARCHAR[]))"
        params.append(list(scope.subjects))
    for key, values in scope.metadata:
        where += " AND json_extract_string(metadata, ?) IN (SELECT unnest(?::VARCHAR[]))"
        params.extend([member_pointer(key), list(values)])
    who_params, _, selected, group = _shape(scope, "count(*), sum(v), min(v), max(v)", "v")
    return (
        f"SELECT {selected} FROM"  # noqa: S608 - fixed text, values bound
        f" (SELECT {subjects.OF_EVENT} AS subject, timestamp, {value} AS v"
        f" FROM events WHERE {where}) e"
        f" JOIN {cte} p ON e.timestamp >= p.lo AND e.timestamp < p.hi"
        f" WHERE v IS NOT NULL {group}",
        [*who_params, *value_params, *params, *cte_params],
    )


def _partials(
    con: duckdb.DuckDBPyConnection, scope: Scope, queries: list[SQL]
) -> dict[Key, Partial]:
    """The partials of `queries` (each `from_rollups` or `from_events`), in one statement: each
    costs DuckDB several milliseconds here, whatever it reads."""
    if not queries:
        return {}
    rows = con.execute(
        " UNION ALL ".join(f"({sql})" for sql, _ in queries),
        [p for _, params in queries for p in params],
    ).fetchall()
    return _collect(rows, isinstance(scope.meter.aggregation, UniqueAggregation))


def _span(ranges: Sequence[tuple[int, int, int]]) -> list[int]:
    return [min(r[1] for r in ranges), max(r[2] for r in ranges)]


def _collect(rows: list[tuple[Any, ...]], unique: bool) -> dict[Key, Partial]:
    partials: dict[Key, Partial] = {}
    for row in rows:
        partial = partials.setdefault((row[0], row[1]), Partial())
        if unique:
            partial.values.add(row[2])
        else:
            partial.add(row[2], row[3], row[4], row[5])
    return partials


def merge_into(target: dict[Key, Partial], source: dict[Key, Partial]) -> None:
    for key, partial in source.items():
        target.setdefault(key, Partial()).merge(partial)


def _merged_by_customer(partials: dict[Key, Partial], indexes: range) -> dict[Key, Partial]:
    """The partials of ranges `indexes` merged per customer, as range 0."""
    merged: dict[Key, Partial] = {}
    for (index, customer), partial in partials.items():
        if index in indexes:
            merged.setdefault((0, customer), Partial()).merge(partial)
    return merged


def exact_range(
    con: duckdb.DuckDBPyConnection, scope: Scope, start_us: int, end_us: int
) -> dict[Key, Partial]:
    """Partials of exactly the events in [start, end] (index 0)."""
    whole, edges = _split(scope, 0, [(start_us, end_us)])
    return _partials(con, scope, _queries(scope, whole, edges))


def _queries(
    scope: Scope, whole: list[tuple[int, int, int]], edges: list[tuple[int, int, int]]
) -> list[SQL]:
    """Whole buckets from the rollups (or the events, for a scope filtering on metadata, which
    rollups do not hold); each edge from the events, a query of its own so that each reads only
    its span of events."""
    source = from_events if scope.metadata else from_rollups
    return ([source(scope, whole)] if whole else []) + [from_events(scope, [e]) for e in edges]


def _split(
    scope: Scope, index: int, pieces: Sequence[tuple[int, int]]
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """The ranges (`index`, lo, hi) that together hold exactly the events of `pieces` ([start,
    end] each): whole buckets, which the rollups can answer, and the edges, which only the
    events can (a scope reading the events anyway takes each piece whole, in one query)."""
    whole: list[tuple[int, int, int]] = []
    edges: list[tuple[int, int, int]] = []
    for start_us, end_us in pieces:
        stop = end_us + 1  # inclusive end
        first = -(-start_us // BUCKET_US) * BUCKET_US  # first whole bucket
        last = (stop // BUCKET_US) * BUCKET_US  # end of the last whole bucket
        if scope.metadata or first >= last:
            edges.append((index, start_us, stop))
            continue
        whole.append((index, first, last))
        edges += [e for e in ((index, start_us, first), (index, last, stop)) if e[1] < e[2]]
    return whole, edges


def reduce(partials: dict[Key, Partial], meter: MeterRow, index: int, across: str | None) -> float:
    """The quantity of range `index`: the meter's aggregation, or with `across` set, the
    per-customer quantities combined by that function (Polar's customer_aggregation_function).
    """
    mine = {key[1]: p for key, p in partials.items() if key[0] == index}
    if across is None:
        merged = Partial()
        for partial in mine.values():
            merged.merge(partial)
        return merged.result(meter.aggregation.func)
    per_customer = [p.result(meter.aggregation.func) for p in mine.values()]
    if not per_customer:
        return 0.0
    if across == "count":
        return float(len(per_customer))
    if across == "sum":
        return math.fsum(per_customer)
    if across == "avg":
        return math.fsum(per_customer) / len(per_customer)
    if across == "unique":
        return float(len(set(per_customer)))
    return max(per_customer) if across == "max" else min(per_customer)


@dataclass(frozen=True, slots=True)
class Gathered:
    """A meter's partials over the periods of a window (range i: periods i to i + 1) and over
    exactly the window (`total`, range 0): what `compute` reduces, and what shards merge."""

    periods: list[datetime]  # the periods' bounds
    partials: dict[Key, Partial]
    total: dict[Key, Partial]

    def merge(self, other: Gathered) -> None:
        """Add `other`'s partials (of other events, over the same periods)."""
        merge_into(self.partials, other.partials)
        merge_into(self.total, other.total)

    def reduced(
        self, meter: MeterRow, across: str | None
    ) -> tuple[list[tuple[datetime, float]], float]:
        """Each period's quantity and the window's."""
        return (
            [
                (self.periods[i], reduce(self.partials, meter, i, across))
                for i in range(len(self.periods) - 1)
            ],
            reduce(self.total, meter, 0, across),
        )


def gather(
    con: duckdb.DuckDBPyConnection,
    scope: Scope,
    start_us: int,
    end_us: int,
    interval: Interval,
    tz: ZoneInfo,
) -> Gathered:
    """Partials of the periods intersecting [start, end] and of exactly that range."""
    periods = boundaries(us_to_datetime(start_us), us_to_datetime(end_us), interval, tz)
    bounds = [datetime_to_us(p) for p in periods]
    ranges = [(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    # The total reuses the periods that lie inside the range; the rest of it is read in the
    # same query as the periods (its whole buckets, as range `rest`) and from the edges' events.
    inside = [r for r in ranges if start_us <= r[1] and r[2] <= end_us + 1]
    pieces = [(start_us, end_us)]
    if inside:
        pieces = [(start_us, inside[0][1] - 1)] if start_us < inside[0][1] else []
        pieces += [(inside[-1][2], end_us)] if inside[-1][2] <= end_us else []
    rest = len(ranges)
    whole, edges = _split(scope, rest, pieces)
    partials = _partials(con, scope, _queries(scope, ranges + whole, edges))
    total = _merged_by_customer(partials, range(rest, rest + 1))
    if inside:
        merge_into(total, _merged_by_customer(partials, range(inside[0][0], inside[-1][0] + 1)))
    return Gathered(periods, {k: p for k, p in partials.items() if k[0] < rest}, total)


def compute(
    con: duckdb.DuckDBPyConnection,
    scope: Scope,
    start_us: int,
    end_us: int,
    interval: Interval,
    tz: ZoneInfo,
    across: str | None,
) -> tuple[list[tuple[datetime, float]], float]:
    """Quantities of the periods intersecting [start, end] and the total of exactly that range."""
    return gather(con, scope, start_us, end_us, interval, tz).reduced(scope.meter, across)
