"""Data dirs as earlier versions left them, made from one the current code wrote: for the tests
that open such a data dir with the current code (its migrations must take it from there)."""

from __future__ import annotations

import duckdb

SEGMENTS = 29  # the schema step that made the events and the rollups segments
CORRECTIONS = 30  # the step that made voided events and event versions
VOID_JOBS = 31  # the step that made void jobs
DIMENSIONS = 32  # the step that gave meters their dimensions
GROUPS = 33  # the step that made the rollups of a meter's groups
FORWARDED_GROUPS = 34  # the step that keyed rollup-mode forwarding by group too
FOLDED = 35  # the step that listed the meters whose groups held `OTHER`
PRICING = 36  # the step that made the organizations' pricing settings
TOP_UPS = 37  # the step that made top-up rules and top-ups
LEDGER_CHECKPOINTS = 38  # the step that made the ledger's keyed tables its checkpoint's
# The rollup tables and their deltas before segments.
_ROLLUPS = {
    "rollups": "rollup_deltas",
    "rollup_values": "rollup_value_deltas",
    "rollup_points": "rollup_point_deltas",
}


def before_segments(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 28 had it: the events and the rollups as tables (what the
    segments held, copied in; the rollups' delta tables empty beside them), no segments table;
    the files themselves are left where they are, listed by nothing."""
    before_corrections(con)
    con.execute("CREATE TABLE events_kept AS SELECT * FROM events ORDER BY seq")
    con.execute("DROP VIEW events")
    con.execute("DROP TABLE events_base")
    con.execute("ALTER TABLE events_kept RENAME TO events")
    for table, deltas in _ROLLUPS.items():
        con.execute(f"CREATE TABLE {table}_kept AS SELECT * FROM all_{table}")
        con.execute(f"DROP VIEW all_{table}")
        con.execute(f"DROP TABLE {table}")
        con.execute(f"ALTER TABLE {table}_kept RENAME TO {table}")
        con.execute(f"CREATE TABLE {deltas} AS SELECT * FROM {table} LIMIT 0")
        con.execute(
            f"CREATE VIEW all_{table} AS SELECT * FROM {table} UNION ALL SELECT * FROM {deltas}"
        )
    con.execute("DROP TABLE segments")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {SEGMENTS}")


def before_ledger_checkpoints(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 37 had it (the previous main's): the ledger's usage in its
    keyed tables (what its files hold, merged per key, copied in), empty delta tables and the
    views merging both; no list of changes (a store closed cleanly leaves none); the files
    are left where they are, listed by nothing."""
    [(changes,)] = con.execute("SELECT count(*) FROM ledger_changes").fetchall()
    assert changes == 0, "a data dir closed cleanly"
    merged = {
        "ledger_usage": "SELECT meter_id, subject, sum(events), sum(total), min(low), max(high),"
        " min(created_at), max(modified_at) FROM checkpointed_ledger_usage GROUP BY ALL",
        "ledger_usage_values": "SELECT DISTINCT * FROM checkpointed_ledger_usage_values",
        "ledger_points": "SELECT meter_id, subject, p.at_us, p.value FROM (SELECT meter_id,"
        " subject, max({'at_us': at_us, 'value': value}) AS p FROM checkpointed_ledger_points"
        " GROUP BY ALL)",
    }
    for table, deltas in (
        ("ledger_usage", "ledger_usage_deltas"),
        ("ledger_usage_values", "ledger_usage_value_deltas"),
        ("ledger_points", "ledger_point_deltas"),
    ):
        con.execute(f"CREATE TEMP TABLE kept AS {merged[table]}")
        con.execute(f"INSERT INTO {table} SELECT * FROM kept")
        con.execute("DROP TABLE kept")
        con.execute(f"DROP VIEW checkpointed_{table}")
        con.execute("DELETE FROM segments WHERE relation = ?", [table])
        con.execute(f"CREATE TABLE {deltas} AS SELECT * FROM {table} LIMIT 0")
        con.execute(
            f"CREATE VIEW all_{table} AS SELECT * FROM {table} UNION ALL SELECT * FROM {deltas}"
        )
    con.execute("DROP TABLE ledger_changes")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {LEDGER_CHECKPOINTS}")


def before_top_ups(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 36 had it: no top-up rules."""
    before_ledger_checkpoints(con)
    con.execute("DROP TABLE top_up_rules")
    con.execute("DROP TABLE top_ups")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {TOP_UPS}")


def before_pricing(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 35 had it (the previous main's): no pricing settings, no
    top-up rules."""
    before_top_ups(con)
    con.execute("DROP TABLE pricing_settings")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {PRICING}")


def before_folded(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 34 had it: no list of the meters whose groups held
    `OTHER`."""
    before_pricing(con)
    con.execute("DROP TABLE folded_meters")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {FOLDED}")


def before_forwarded_groups(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 33 had it: what rollup mode forwarded, per meter, customer
    and period (no group)."""
    before_folded(con)
    con.execute(
        "CREATE TABLE forward_rollups_plain AS SELECT organization_id, meter_id, subject,"
        " period, units, events, revision FROM forward_rollups"
    )
    con.execute("DROP TABLE forward_rollups")
    con.execute(
        "CREATE TABLE forward_rollups (organization_id UUID NOT NULL, meter_id UUID NOT NULL,"
        " subject VARCHAR NOT NULL, period TIMESTAMPTZ NOT NULL, units DOUBLE NOT NULL,"
        " events BIGINT NOT NULL, revision INTEGER NOT NULL,"
        " PRIMARY KEY (organization_id, meter_id, subject, period))"
    )
    con.execute("INSERT INTO forward_rollups SELECT * FROM forward_rollups_plain")
    con.execute("DROP TABLE forward_rollups_plain")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {FORWARDED_GROUPS}")


def before_groups(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 32 had it: no rollups of a meter's groups (their files
    left where they are, listed by nothing)."""
    before_forwarded_groups(con)
    con.execute("DROP VIEW all_rollup_groups")
    con.execute("DROP TABLE rollup_groups")
    con.execute("DROP TABLE rollup_groups_pending")
    con.execute("DELETE FROM segments WHERE relation = 'rollup_groups'")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {GROUPS}")


def before_dimensions(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 31 had it: meters without dimensions."""
    before_groups(con)
    con.execute("ALTER TABLE meters DROP COLUMN dimensions")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {DIMENSIONS}")


def before_void_jobs(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 30 had it: no void jobs, the voided events a table keyed
    by seq (what its segments held, copied in; the files left where they are, listed by
    nothing)."""
    before_dimensions(con)
    con.execute("DROP TABLE void_jobs")
    con.execute("CREATE TABLE voided_events_plain AS SELECT * FROM voided_events")
    con.execute("DROP VIEW voided_events")
    con.execute("DROP TABLE voided_events_base")
    con.execute(
        "CREATE TABLE voided_events (seq BIGINT PRIMARY KEY, organization_id UUID NOT NULL,"
        " request_id VARCHAR NOT NULL, reason VARCHAR NOT NULL, voided_at TIMESTAMPTZ NOT NULL)"
    )
    con.execute("INSERT INTO voided_events SELECT * FROM voided_events_plain")
    con.execute("DROP TABLE voided_events_plain")
    con.execute("DELETE FROM segments WHERE relation = 'voided_events'")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {VOID_JOBS}")


def before_corrections(con: duckdb.DuckDBPyConnection) -> None:
    """The database as schema step 29 had it (no event was voided or amended): the events
    relation read through `events` itself, no table of corrections."""
    before_void_jobs(con)
    con.execute("DROP VIEW events")
    con.execute("ALTER VIEW all_events RENAME TO events")
    con.execute("DROP TABLE voided_events")
    con.execute("DROP TABLE event_versions")
    con.execute(f"DELETE FROM schema_migrations WHERE version >= {CORRECTIONS}")
