"""Idempotency keys of the ledger's operations: one key space per operation and organization.

Credits, resets and plans are keyed by the caller's `external_id`. The keys live here, apart
from event external_ids, so that no event external_id is reserved and no event can turn a real
credit into a replay. A key remembers a digest of the request that first used it and what that
request answered: the same request again gets the stored answer, a different one is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import orjson
from pydantic import BaseModel

from aggregator.errors import KeyReused
from aggregator.store.base.rows import first_row

Operation = Literal["credit", "reset", "plan", "hold", "alert"]


@dataclass(frozen=True, slots=True)
class Used:
    """A key used before by the same request; `result` is what it answered (None for keys
    used before results were kept)."""

    result: Any


def digest(request: BaseModel) -> str:
    """The request as validated, canonically: equal for equal requests however spelled."""
    canonical = orjson.dumps(request.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def recall(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    operation: Operation,
    key: str,
    request: str,
) -> Used | None:
    """None for a new key; raises KeyReused when the key was used by a different request."""
    row = first_row(
        con,
        "SELECT request, result FROM idempotency_keys"
        " WHERE organization_id = ?::UUID AND operation = ? AND key = ?",
        [organization_id, operation, key],
    )
    if row is None:
        return None
    if row[0] is not None and row[0] != request:
        raise KeyReused(operation, key)
    return Used(None if row[1] is None else orjson.loads(row[1]))


def remember(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    operation: Operation,
    key: str,
    request: str,
    result: Any,
    now_us: int,
) -> None:
    con.execute(
        "INSERT INTO idempotency_keys VALUES (?::UUID, ?, ?, ?, ?, make_timestamptz(?))",
        [organization_id, operation, key, request, orjson.dumps(result).decode(), now_us],
    )
