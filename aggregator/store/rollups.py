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
    *,
    backfill: bool = False,
    ledger: bool = True,
) -> None:
    """Add the events of `source` selected by `where` to the rollups of each of `meters`, and
    to their customers' ledger usage (the usage since each customer's latest reset).

    One statement for the number meters and one for the unique ones, whatever their count:
    each reads the events once, parses each metadata document once for every path the meters
    use, and the grouped rows feed both the rollups and the ledger. Live ingest applies events
    newer than any reset; a `backfill` (of stored events, one meter) skips, for the ledger, the
    events a customer's reset has already closed. `ledger=False` leaves the ledger alone (to
    measure what it costs).
    """
    numbers = [m for m in meters if not isinstance(m.aggregation, UniqueAggregation)]
    uniques = [m for m in meters if isinstance(m.aggregation, UniqueAggregation)]
    if numbers:
        values, values_params = _values(numbers, source, where, params)
        parts = ", ".join(
            f"{{'m': ?::UUID, 'n': count(v{i}), 't': sum(v{i}), 'l': min(v{i}), 'h': max(v{i})}}"
            for i in range(len(numbers))
        )
        deltas = con.sql(
            f"SELECT p.m AS meter_id, subject, bucket, p.n AS events, p.t AS total, p.l AS low,"
            f" p.h AS high FROM (SELECT subject, bucket, unnest([{parts}]) AS p FROM ({values})"
            " GROUP BY subject, bucket) WHERE p.n > 0",
            params=[*(m.id for m in numbers), *values_params],
        ).to_arrow_table()
        con.register("_deltas", deltas)
        try:
            con.execute(
                f"INSERT INTO rollups SELECT * FROM _deltas ON CONFLICT DO UPDATE SET {_MERGE}"
            )
            if ledger and not backfill:
                con.execute(
                    "INSERT INTO ledger_usage SELECT meter_id, subject, sum(events), sum(total),"
                    " min(low), max(high), now(), now() FROM _deltas GROUP BY meter_id, subject"
                    f" ON CONFLICT DO UPDATE SET {_LEDGER_MERGE}"
                )
        finally:
            con.unregister("_deltas")
        if ledger and backfill:
            _backfill_ledger(con, numbers, values, values_params)
    if uniques:
        values, values_params = _values(uniques, source, where, params)
        parts = ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i in range(len(uniques)))
        rows = (
            f"SELECT p.m AS meter_id, subject, bucket, seq, p.v AS value FROM"
            f" (SELECT subject, bucket, seq, unnest([{parts}]) AS p FROM ({values}))"
            " WHERE p.v IS NOT NULL"
        )
        distinct = con.sql(
            f"SELECT DISTINCT meter_id, subject, bucket, seq, value FROM ({rows})",
            params=[*(m.id for m in uniques), *values_params],
        ).to_arrow_table()
        con.register("_distinct", distinct)
        try:
            con.execute(
                "INSERT INTO rollup_values SELECT DISTINCT meter_id, subject, bucket, value"
                " FROM _distinct ON CONFLICT DO NOTHING"
            )
            after_reset = _AFTER_RESET if backfill else "TRUE"
            if ledger:
                con.execute(
                    "INSERT INTO ledger_usage_values SELECT DISTINCT meter_id, subject, value"
                    f" FROM _distinct u WHERE {after_reset} ON CONFLICT DO NOTHING"
                )
        finally:
            con.unregister("_distinct")


_MERGE = (
    "events = events + excluded.events, total = total + excluded.total,"
    " low = least(low, excluded.low), high = greatest(high, excluded.high)"
)
_LEDGER_MERGE = f"{_MERGE}, modified_at = excluded.modified_at"
# The customer references a reset has closed, with the seq of that reset: 'id:<customer>' and,
# when the customer has one, 'ext:<its external id>'.
RESETS = (
    "SELECT cm.meter_id, s.subject, cm.reset_seq FROM customer_meters cm"
    " JOIN customers c ON c.id = cm.customer_id,"
    " unnest(['id:' || c.id::VARCHAR, 'ext:' || c.external_id]) s(subject)"
    " WHERE cm.reset_seq > 0 AND s.subject IS NOT NULL"
)
_AFTER_RESET = (
    f"u.seq > coalesce((SELECT max(r.reset_seq) FROM ({RESETS}) r"
    " WHERE r.meter_id = u.meter_id AND r.subject = u.subject), 0)"
)


def _backfill_ledger(
    con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow], values: str, params: list[Any]
) -> None:
    """Ledger usage from stored events: only those after their customer's latest reset."""
    parts = ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i in range(len(meters)))
    con.execute(
        "INSERT INTO ledger_usage SELECT meter_id, subject, count(*), sum(v), min(v), max(v),"
        " now(), now()"
        f" FROM (SELECT p.m AS meter_id, subject, seq, p.v AS v FROM"
        f" (SELECT subject, seq, unnest([{parts}]) AS p FROM ({values}))) u"
        f" WHERE v IS NOT NULL AND {_AFTER_RESET} GROUP BY meter_id, subject"
        f" ON CONFLICT DO UPDATE SET {_LEDGER_MERGE}",
        [*(m.id for m in meters), *params],
    )


def _values(
    meters: Sequence[MeterRow], source: str, where: str, params: list[Any]
) -> tuple[str, list[Any]]:
    """A query of (subject, bucket, seq, v0 .. vN): vI is meter I's contribution of the event, NULL
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
        f"WITH r AS MATERIALIZED (SELECT {SUBJECT} AS subject, {BUCKET} AS bucket, seq, name,"
        f" source, timestamp, {projection} FROM {source} WHERE {where}),"
        f" f AS MATERIALIZED (SELECT *, {extracted.facets()} FROM r),"
        f" e AS MATERIALIZED (SELECT subject, bucket, seq, {', '.join(columns)} FROM f)"
        " SELECT * FROM e",
        [*projection_params, *params, *columns_params],
    )
