"""Rollups: each meter's mergeable partial aggregates, kept current by ingest and backfill.

Per (meter, customer reference, 15-minute UTC bucket): the number of events in the meter, the
sum, min and max of their contributions (count: 1 each) and, for unique meters, the set of
distinct values. Any interval in any timezone is a union of buckets, so quantities merge rows
instead of rescanning events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import duckdb

from aggregator.store.meter_sql import contribution_sql, filter_sql
from meters.aggregations import UniqueAggregation

if TYPE_CHECKING:
    from aggregator.store.meters import MeterRow

BUCKET = "time_bucket(INTERVAL 15 MINUTE, timestamp)"
SUBJECT = (
    "CASE WHEN customer_id IS NOT NULL THEN 'id:' || customer_id::VARCHAR"
    " ELSE 'ext:' || external_customer_id END"
)


def apply(
    con: duckdb.DuckDBPyConnection, meter: MeterRow, source: str, where: str, params: list[Any]
) -> None:
    """Add the events of `source` selected by `where` (and the meter) to the meter's rollups."""
    # The filter alone (not meter_events_sql): the contribution, computed once in the
    # materialized CTE, is NULL exactly when the aggregation's implicit filter excludes the
    # event. Without MATERIALIZED, DuckDB re-evaluates the JSON expressions per use.
    in_filter, in_filter_params = filter_sql(meter.filter)
    value, value_params = contribution_sql(meter.aggregation)
    rows = (
        f"WITH e AS MATERIALIZED (SELECT {SUBJECT} AS subject, {BUCKET} AS bucket, {value} AS v"
        f" FROM {source} WHERE {where} AND {in_filter}) SELECT subject, bucket, v FROM e"
    )
    rows_params = [*value_params, *params, *in_filter_params]
    if isinstance(meter.aggregation, UniqueAggregation):
        con.execute(
            f"INSERT INTO rollup_values SELECT DISTINCT ?::UUID, subject, bucket, v FROM ({rows})"
            " WHERE v IS NOT NULL ON CONFLICT DO NOTHING",
            [meter.id, *rows_params],
        )
        return
    con.execute(
        "INSERT INTO rollups SELECT ?::UUID, subject, bucket, count(*), sum(v), min(v), max(v)"
        f" FROM ({rows}) WHERE v IS NOT NULL GROUP BY subject, bucket"
        " ON CONFLICT DO UPDATE SET events = events + excluded.events,"
        " total = total + excluded.total, low = least(low, excluded.low),"
        " high = greatest(high, excluded.high)",
        [meter.id, *rows_params],
    )
