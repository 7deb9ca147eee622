"""`migrations.migrate`: a new database takes every step in one transaction (a failure leaves
no schema half made, and the next start makes it whole); a database with data takes a step
per transaction (a failure leaves the steps before it applied, and the next start goes on).
A step is made to fail by a table of the same name, and wrong columns, made before it."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from aggregator.store.engine.migrations import MIGRATIONS, migrate

LAST = len(MIGRATIONS)
GRANTS = 27  # the step that makes credit_grants (after rollup_points, step 26)


def _version(con: duckdb.DuckDBPyConnection) -> int:
    return int(
        con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0]
    )


def _has(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table])
    return bool(found.fetchall()[0][0])


def test_a_new_database_is_made_whole_or_not_at_all(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "new.db"))
    con.execute("CREATE TABLE credit_grants (wrong INTEGER)")  # a late step fails
    with pytest.raises(duckdb.Error):
        migrate(con)
    assert _version(con) == 0
    assert not _has(con, "events")  # the first step's table: rolled back with the rest
    con.execute("DROP TABLE credit_grants")
    assert migrate(con) == LAST
    assert _version(con) == LAST and _has(con, "events_base")


def test_a_database_with_data_keeps_the_steps_before_a_failure(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "old.db"))
    migrate(con, until=GRANTS - 2)
    con.execute("CREATE TABLE credit_grants (wrong INTEGER)")
    with pytest.raises(duckdb.Error):
        migrate(con)
    assert _version(con) == GRANTS - 1 and _has(con, "rollup_points")  # the step before: kept
    con.execute("DROP TABLE credit_grants")
    assert migrate(con) == LAST
    assert _version(con) == LAST
