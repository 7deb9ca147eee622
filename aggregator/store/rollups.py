"""Rollups: each meter's mergeable partial aggregates, kept current by ingest and backfill.

Per (meter, customer reference, 15-minute UTC bucket): the number of events in the meter, the
sum, min and max of their contributions (count: 1 each) and, for unique meters, the set of
distinct values. Any interval in any timezone is a union of buckets, so quantities merge rows
instead of rescanning events. Ingest appends deltas; readers read the `all_*` views (the keyed
tables and their deltas, see `compaction`).
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

    Every meter's contribution of every event is computed in one statement (each metadata
    document parsed once for every path the meters use); the batch's partial aggregates per
    meter, customer reference and bucket are then appended to the delta tables, which
    `compaction` folds into the keyed tables later. Live ingest applies events newer than any
    reset; a `backfill` (of stored events, one meter) skips, for the ledger, the events a
    customer's reset has already closed. `ledger=False` leaves the ledger alone (to measure
    what it costs).
    """
    if not meters:
        return
    values, values_params = _values(meters, source, where, params)
    con.register("_values", con.sql(values, params=values_params).to_arrow_table())
    try:
        numbers = [(i, m) for i, m in enumerate(meters) if not _is_unique(m)]
        uniques = [(i, m) for i, m in enumerate(meters) if _is_unique(m)]
        if numbers:
            _apply_numbers(con, numbers, backfill=backfill, ledger=ledger)
        if uniques:
            _apply_uniques(con, uniques, backfill=backfill, ledger=ledger)
    finally:
        con.unregister("_values")


def _is_unique(meter: MeterRow) -> bool:
    return isinstance(meter.aggregation, UniqueAggregation)


def _apply_numbers(
    con: duckdb.DuckDBPyConnection,
    meters: list[tuple[int, MeterRow]],
    *,
    backfill: bool,
    ledger: bool,
) -> None:
    parts = ", ".join(
        f"{{'m': ?::UUID, 'n': count(v{i}), 't': sum(v{i}), 'l': min(v{i}), 'h': max(v{i})}}"
        for i, _ in meters
    )
    ids = [m.id for _, m in meters]
    con.execute(
        f"INSERT INTO rollup_deltas SELECT p.m, subject, bucket, p.n, p.t, p.l, p.h FROM"
        f" (SELECT subject, bucket, unnest([{parts}]) AS p FROM _values GROUP BY subject, bucket)"
        " WHERE p.n > 0",
        ids,
    )
    if ledger and not backfill:
        con.execute(
            f"INSERT INTO ledger_usage_deltas SELECT p.m, subject, p.n, p.t, p.l, p.h, now(),"
            f" now() FROM (SELECT subject, unnest([{parts}]) AS p FROM _values GROUP BY subject)"
            " WHERE p.n > 0",
            ids,
        )
    if ledger and backfill:
        # Only the events after their customer's latest reset.
        parts = ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i, _ in meters)
        con.execute(
            "INSERT INTO ledger_usage_deltas SELECT meter_id, subject, count(*), sum(v),"
            " min(v), max(v), now(), now()"
            f" FROM (SELECT p.m AS meter_id, subject, seq, p.v AS v FROM"
            f" (SELECT subject, seq, unnest([{parts}]) AS p FROM _values)) u"
            f" WHERE v IS NOT NULL AND {_AFTER_RESET} GROUP BY meter_id, subject",
            ids,
        )


def _apply_uniques(
    con: duckdb.DuckDBPyConnection,
    meters: list[tuple[int, MeterRow]],
    *,
    backfill: bool,
    ledger: bool,
) -> None:
    parts = ", ".join(f"{{'m': ?::UUID, 'v': v{i}}}" for i, _ in meters)
    rows = (
        f"SELECT p.m AS meter_id, subject, bucket, seq, p.v AS value FROM"
        f" (SELECT subject, bucket, seq, unnest([{parts}]) AS p FROM _values)"
        " WHERE p.v IS NOT NULL"
    )
    distinct = con.sql(
        f"SELECT DISTINCT meter_id, subject, bucket, seq, value FROM ({rows})",
        params=[m.id for _, m in meters],
    ).to_arrow_table()
    con.register("_distinct", distinct)
    try:
        con.execute(
            "INSERT INTO rollup_value_deltas SELECT DISTINCT meter_id, subject, bucket, value"
            " FROM _distinct"
        )
        if ledger:
            after_reset = _AFTER_RESET if backfill else "TRUE"
            con.execute(
                "INSERT INTO ledger_usage_value_deltas SELECT DISTINCT meter_id, subject, value"
                f" FROM _distinct u WHERE {after_reset}"
            )
    finally:
        con.unregister("_distinct")


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
