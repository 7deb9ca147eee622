"""Reading single rows without leaving a result open (an open result blocks checkpoints), and
ids checked before they reach a UUID cast."""

from __future__ import annotations

import uuid
from typing import Any

import duckdb


def first_row(
    con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None = None
) -> tuple[Any, ...] | None:
    rows = con.execute(query, params or []).fetchall()
    return rows[0] if rows else None


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
