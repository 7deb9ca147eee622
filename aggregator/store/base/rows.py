"""Reading single rows without leaving a result open (an open result blocks checkpoints), Arrow
tables registered for the statements that read them, ids checked before they reach a UUID
cast, lists of values a scan filters by, and transactions that end cleanly whatever failed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from meters.wire import is_canonical_id


def first_row(
    con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None = None
) -> tuple[Any, ...] | None:
    rows = con.execute(query, params or []).fetchall()
    return rows[0] if rows else None


def is_uuid(value: str) -> bool:
    """Whether `value` is an id in the one spelling the API passes down (`meters.wire`):
    any other text is no stored row's id, and would fail a UUID cast."""
    return is_canonical_id(value)


def among(column: str, values: Sequence[str], cast: str = "VARCHAR") -> tuple[str, list[Any]]:
    """`column IN (...)` of constants, bound: a list DuckDB filters a scan by and prunes files'
    row groups with, where a subquery (a semi join) it applies only after reading the rows."""
    if not values:
        return "FALSE", []
    return f"{column} IN ({', '.join(f'?::{cast}' for _ in values)})", list(values)


@contextlib.contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    """`table` readable as `name` on `con` while the block runs."""
    con.register(name, table)
    try:
        yield
    finally:
        con.unregister(name)


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN; COMMIT once the block ends, ROLLBACK (`rollback`) if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """ROLLBACK after a failure. A COMMIT that failed (a full disk) has already ended the
    transaction, and the error of a second ROLLBACK would hide the one that says why."""
    with contextlib.suppress(duckdb.TransactionException):
        con.execute("ROLLBACK")
