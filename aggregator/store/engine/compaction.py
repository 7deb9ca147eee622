"""Compaction: the ledger's appended deltas merged into the tables readers merge them with.

Each flush appends its batches' usage (per meter and customer reference) to unindexed delta
tables: an append costs a fraction of an upsert into a keyed table, whose index every row must
probe and update. Every partial state here is mergeable (counts and sums add, minima and maxima
take the extreme, value sets unite, a latest point is the greatest), so a reader merging a
table with its deltas (the `all_*` views) gets the same answer before and after any merge, and
a merge may run at any point, emptying the deltas it folds in the same transaction (`compact`,
every second). (Rollups, per bucket too, are segments instead: `segments`.)
"""

from __future__ import annotations

import duckdb

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
# Every table a customer's usage since its reset lives in: what a reset must clear.
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
