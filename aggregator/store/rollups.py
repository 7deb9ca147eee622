"""Rollups: each meter's mergeable partial aggregates, kept current by ingest and backfill.

Per (meter, customer reference, 15-minute UTC bucket): the number of events in the meter, the
sum, min and max of their contributions (count: 1 each) and, for unique meters, the set of
distinct values. Any interval in any timezone is a union of buckets, so quantities merge rows
instead of rescanning events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import duckdb

from aggregator.store.meter_sql import Extracted, contribution_sql, filter_sql
from meters.aggregations import UniqueAggregation

if TYPE_CHECKING:
    from aggregator.store.meters import MeterRow

BUCKET = "time_bucket(INTERVAL 15 MINUTE, timestamp)"
SUBJECT = (
    "CASE WHEN customer_id IS NOT NULL THEN 'id:' || customer_id::VARCHAR"
    " ELSE 'ext:' || external_customer_id END"
)


def apply(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
) -> None:
    """Add the events of `source` selected by `where` to the rollups of each of `meters`.

    One statement for the number meters and one for the unique ones, whatever their count:
    each reads the events once, parses each metadata document once for every path the meters
    use, and upserts all the meters' rows together.
    """
    numbers = [m for m in meters if not isinstance(m.aggregation, UniqueAggregation)]
    uniques = [m for m in meters if isinstance(m.aggregation, UniqueAggregation)]
    if numbers:
        values, values_params = _values(numbers, source, where, params)
        parts = ", ".join(
            f"{{'m': ?::UUID, 'n': count(v{i}), 't': sum(v{i}), 'l': min(v{i}), 'h': max(v{i})}}"
            for i in range(len(numbers))
        )
        con.execute(
            f"INSERT INTO rollups SELECT p.m, subject, bucket, p.n, p.t, p.l, p.h FROM"
            f" (SELECT subject, bucket, unnest([{parts}]) AS p FROM ({values})"
            " GROUP BY subject, bucket) WHERE p.n > 0"
            " ON CONFLICT DO UPDATE SET events = events + excluded.events,"
            " total = total + excluded.total, low = least(low, excluded.low),"
            " high = greatest(high, excluded.high)",
            [*(m.id for m in numbers), *values_params],
        )
    if uniques:
        values, values_params = _values(uniques, source, where, params)
        parts = ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i in range(len(uniques)))
        con.execute(
            "INSERT INTO rollup_values SELECT DISTINCT p.m, subject, bucket, p.v FROM"
            f" (SELECT subject, bucket, unnest([{parts}]) AS p FROM ({values}))"
            " WHERE p.v IS NOT NULL ON CONFLICT DO NOTHING",
            [*(m.id for m in uniques), *values_params],
        )


def _values(
    meters: Sequence[MeterRow], source: str, where: str, params: list[Any]
) -> tuple[str, list[Any]]:
    """A query of (subject, bucket, v0 .. vN): vI is meter I's contribution of the event, NULL
    when the event is not in the meter (its filter, or the aggregation's implicit one)."""
    extracted = Extracted()
    columns: list[str] = []
    columns_params: list[Any] = []
    for i, meter in enumerate(meters):
        in_filter, in_filter_params = filter_sql(meter.filter, extracted)
        value, value_params = contribution_sql(meter.aggregation, extracted)
        columns.append(f"CASE WHEN {in_filter} THEN {value} END AS v{i}")
        columns_params += [*in_filter_params, *value_params]
    projection, projection_params = extracted.projection()
    # Each step MATERIALIZED: otherwise DuckDB inlines the projections and evaluates the JSON
    # parse, and each facet, once per use.
    return (
        f"WITH r AS MATERIALIZED (SELECT {SUBJECT} AS subject, {BUCKET} AS bucket, name, source,"
        f" timestamp, {projection} FROM {source} WHERE {where}),"
        f" f AS MATERIALIZED (SELECT *, {extracted.facets()} FROM r),"
        f" e AS MATERIALIZED (SELECT subject, bucket, {', '.join(columns)} FROM f)"
        " SELECT * FROM e",
        [*projection_params, *params, *columns_params],
    )
