"""Compaction: appended deltas merged into the tables readers merge them with.

Ingest appends each batch's partial aggregates (per meter, customer reference and bucket) to
unindexed delta tables: an append costs a fraction of an upsert into a keyed table, whose index
every row must probe and update. Every partial state here is mergeable (counts and sums add,
minima and maxima take the extreme, value sets and point sets unite, a latest point is the
greatest), so a reader merging a table with its
deltas (the `all_*` views) gets the same answer before and after any merge, and a merge may run
at any point, emptying the deltas it folds in the same transaction.

The ledger's usage (one row per meter and customer reference) is folded into its keyed tables
(`compact`, every second). Rollups, one row per meter, customer reference and 15-minute bucket,
are rewritten instead (`recluster`): the table and its deltas merged and sorted by meter,
customer and bucket, without an index, so that one customer's rows are a few row groups that
DuckDB's zone maps find without reading the others (`store.recluster` decides when).
"""

from __future__ import annotations

import duckdb

from aggregator.store.base.rows import transaction

_NUMBERS = "sum(events), sum(total), min(low), max(high)"
_MERGE = (
    "events = events + excluded.events, total = total + excluded.total,"
    " low = least(low, excluded.low), high = greatest(high, excluded.high)"
)
# (keyed table, its deltas, the deltas merged per key, the upsert's conflict clause)
_STEPS = (
    (
        "ledger_usage",
        "ledger_usage_deltas",
        f"SELECT meter_id, subject, {_NUMBERS}, min(created_at), max(modified_at)"  # noqa: S608 - fixed text, values bound
        " FROM ledger_usage_deltas GROUP BY ALL",
        f"DO UPDATE SET {_MERGE}, created_at = least(created_at, excluded.created_at),"
        " modified_at = greatest(modified_at, excluded.modified_at)",
    ),
    (
        "ledger_usage_values",
        "ledger_usage_value_deltas",
        "SELECT DISTINCT * FROM ledger_usage_value_deltas",
        "DO NOTHING",
    ),
    (
        "ledger_points",
        "ledger_point_deltas",
        "SELECT meter_id, subject, p.at_us, p.value FROM (SELECT meter_id, subject,"
        " max({'at_us': at_us, 'value': value}) AS p FROM ledger_point_deltas GROUP BY ALL)",
        "DO UPDATE SET at_us = excluded.at_us, value = excluded.value"
        " WHERE (excluded.at_us, excluded.value) > (ledger_points.at_us, ledger_points.value)",
    ),
)
# Every table a meter's or a customer's usage lives in: what a reset must clear.
ROLLUP_TABLES = (
    *("rollups", "rollup_deltas", "rollup_values", "rollup_value_deltas"),
    *("rollup_points", "rollup_point_deltas"),
)
LEDGER_TABLES = (
    *("ledger_usage", "ledger_usage_deltas", "ledger_usage_values", "ledger_usage_value_deltas"),
    *("ledger_points", "ledger_point_deltas"),
)


def compact(con: duckdb.DuckDBPyConnection) -> int:
    """Fold every delta into its keyed table (inside the caller's transaction: a writer job);
    return the number of delta rows folded."""
    folded = 0
    for table, deltas, merged, conflict in _STEPS:
        rows = int(con.execute(f"SELECT count(*) FROM {deltas}").fetchall()[0][0])  # noqa: S608 - fixed text, values bound
        if rows:
            con.execute(f"INSERT INTO {table} {merged} ON CONFLICT {conflict}")
            con.execute(f"DELETE FROM {deltas}")  # noqa: S608 - fixed text, values bound
            folded += rows
    return folded


# Rollup tables rewritten by `recluster`: (table, its deltas, its columns, the merged rows).
CLUSTERED = {
    "rollups": (
        "rollup_deltas",
        "(meter_id UUID NOT NULL, subject VARCHAR NOT NULL, bucket TIMESTAMPTZ NOT NULL,"
        " events BIGINT NOT NULL, total DOUBLE NOT NULL, low DOUBLE NOT NULL,"
        " high DOUBLE NOT NULL)",
        f"SELECT meter_id, subject, bucket, {_NUMBERS} FROM"  # noqa: S608 - fixed text, values bound
        " (SELECT * FROM rollups UNION ALL SELECT * FROM rollup_deltas) GROUP BY ALL",
    ),
    "rollup_values": (
        "rollup_value_deltas",
        "(meter_id UUID NOT NULL, subject VARCHAR NOT NULL, bucket TIMESTAMPTZ NOT NULL,"
        " value VARCHAR NOT NULL)",
        "SELECT DISTINCT * FROM"
        " (SELECT * FROM rollup_values UNION ALL SELECT * FROM rollup_value_deltas)",
    ),
    # One point per instant, the greatest value at it (`meters.aggregations.integral`).
    "rollup_points": (
        "rollup_point_deltas",
        "(meter_id UUID NOT NULL, subject VARCHAR NOT NULL, bucket TIMESTAMPTZ NOT NULL,"
        " at_us BIGINT NOT NULL, value DOUBLE NOT NULL)",
        "SELECT meter_id, subject, bucket, at_us, max(value) FROM"
        " (SELECT * FROM rollup_points UNION ALL SELECT * FROM rollup_point_deltas) GROUP BY ALL",
    ),
}


def recluster(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """Rewrite `table` with its deltas merged in, sorted by meter, customer and bucket, in a
    transaction of its own (the caller is in none); return the rows written.

    It deletes the rows it merged rather than only dropping the old table: a job that deleted
    some of them meanwhile (a meter redefined) is then a write conflict, for one of the two to
    run again, instead of rows coming back."""
    deltas, columns, merged = CLUSTERED[table]
    with transaction(con):
        con.execute(f"CREATE TABLE {table}_next {columns}")
        rows = con.execute(
            f"INSERT INTO {table}_next {merged} ORDER BY meter_id, subject, bucket"
        ).fetchall()
        con.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed text, values bound
        con.execute(f"DELETE FROM {deltas}")  # noqa: S608 - fixed text, values bound
        con.execute(f"DROP TABLE {table}")
        con.execute(f"ALTER TABLE {table}_next RENAME TO {table}")
    return int(rows[0][0])
