"""Compaction: appended deltas merged into the keyed rollup and ledger tables.

Ingest appends each batch's partial aggregates (per meter, customer reference and bucket) to
unindexed delta tables: an append costs a fraction of an upsert into a keyed table, whose index
every row must probe and update. Every partial state here is mergeable (counts and sums add,
minima and maxima take the extreme, value sets unite), so a reader merging the keyed table with
its deltas (the `all_*` views) gets the same answer before and after a compaction, and a
compaction may run at any point: it folds the deltas into the keyed table and empties them in
one transaction, each key touched once however many batches wrote it.
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
        "rollups",
        "rollup_deltas",
        f"SELECT meter_id, subject, bucket, {_NUMBERS} FROM rollup_deltas GROUP BY ALL",
        f"DO UPDATE SET {_MERGE}",
    ),
    (
        "ledger_usage",
        "ledger_usage_deltas",
        f"SELECT meter_id, subject, {_NUMBERS}, min(created_at), max(modified_at)"
        " FROM ledger_usage_deltas GROUP BY ALL",
        f"DO UPDATE SET {_MERGE}, modified_at = greatest(modified_at, excluded.modified_at)",
    ),
    (
        "rollup_values",
        "rollup_value_deltas",
        "SELECT DISTINCT * FROM rollup_value_deltas",
        "DO NOTHING",
    ),
    (
        "ledger_usage_values",
        "ledger_usage_value_deltas",
        "SELECT DISTINCT * FROM ledger_usage_value_deltas",
        "DO NOTHING",
    ),
)
# Every table a meter's or a customer's usage lives in: what a reset must clear.
ROLLUP_TABLES = ("rollups", "rollup_deltas", "rollup_values", "rollup_value_deltas")
LEDGER_TABLES = (
    "ledger_usage",
    "ledger_usage_deltas",
    "ledger_usage_values",
    "ledger_usage_value_deltas",
)


def compact(con: duckdb.DuckDBPyConnection) -> int:
    """Fold every delta into its keyed table (inside the caller's transaction: a writer job);
    return the number of delta rows folded."""
    folded = 0
    for table, deltas, merged, conflict in _STEPS:
        rows = int(con.execute(f"SELECT count(*) FROM {deltas}").fetchall()[0][0])
        if rows:
            con.execute(f"INSERT INTO {table} {merged} ON CONFLICT {conflict}")
            con.execute(f"DELETE FROM {deltas}")
            folded += rows
    return folded
