"""The checks that columnar Kafka records get again before they are applied: the store relies
on what the edge checked, and such records may come from any producer."""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import pyarrow as pa

from meters.events import EventRules
from meters.events.schema import CANONICAL_UUID4, ID_FIELDS
from meters.times import MAX_TS_US, MIN_TS_US, ONE_US

__all__ = [
    "row_problems",
]


def row_problems(events: pa.Table, now_us: int, rules: EventRules) -> pa.Array[Any]:
    """Why each row of a columnar record breaks the event rules (null: it does not), checked
    on whole columns. The edge checked every rule; this guards what the store relies on against
    records written by anything else: every column's form and length, one customer id in
    canonical form, the timestamp's range, metadata a JSON object with at most the allowed keys
    in a form meter paths reach, `_cost` equal to cost_amount, `_llm` an object. Not checked
    again (JSON per value costs more than all of this): the lengths and ranges of metadata
    values and the fields of `_llm`."""
    con = _connection()
    # One chunk: a fetch's records are many small chunks, each a little dearer to scan.
    con.register("batch", events.combine_chunks())
    try:
        reasons = con.sql(
            _ROW_CHECKS,
            params={
                "name_max": rules.max_name_length,
                "id_max": rules.max_id_length,
                "keys_max": rules.max_metadata_keys,
                "key_max": rules.max_metadata_key_length,
                "min_us": MIN_TS_US,
                "max_us": min(now_us + rules.max_future // ONE_US, MAX_TS_US),
            },
        ).to_arrow_table()
    finally:
        con.unregister("batch")
    problems: pa.Array[Any] = reasons.column("reason").combine_chunks()
    return problems


_THREAD = threading.local()


def _connection() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB for the checks: opening one costs about 20 ms, as much
    as checking 10,000 rows, so each thread (in practice each decoding worker) keeps one."""
    con: duckdb.DuckDBPyConnection | None = getattr(_THREAD, "con", None)
    if con is None:
        con = _THREAD.con = duckdb.connect(config={"threads": 1})
    return con


# What `meters.events` makes of an amount: no needless zeros, no "-0", ≤ 5 + 12 digits.
_CANONICAL_AMOUNT = r"0|-?([1-9][0-9]{0,4}|0\.[0-9]{0,11}[1-9]|[1-9][0-9]{0,4}\.[0-9]{0,11}[1-9])"


def _id_check(column: str) -> str:
    return (
        f"WHEN {column} IS NOT NULL AND (length({column}) NOT BETWEEN 1 AND $id_max"
        f" OR contains({column}, chr(0))) THEN '{column}: empty, too long or holding a NUL'"
    )


_ROW_CHECKS = f"""
SELECT CASE
    WHEN name IS NULL OR length(name) NOT BETWEEN 1 AND $name_max OR contains(name, chr(0))
        THEN 'name: missing, empty, too long or holding a NUL'
    WHEN (customer_id IS NULL) = (external_customer_id IS NULL)
        THEN 'customer_id: set exactly one of customer_id and external_customer_id'
    WHEN customer_id IS NOT NULL AND NOT regexp_full_match(customer_id, '{CANONICAL_UUID4}')
        THEN 'customer_id: not a UUID4 in canonical (lower-case) form'
    {" ".join(_id_check(c) for c in ID_FIELDS)}
    WHEN timestamp IS NULL OR epoch_us(timestamp) NOT BETWEEN $min_us AND $max_us
        THEN 'timestamp: missing, before year 1 or too far in the future'
    WHEN cost_amount IS NOT NULL AND NOT regexp_full_match(cost_amount, '{_CANONICAL_AMOUNT}')
        THEN 'cost_amount: not a canonical decimal of at most 5 whole and 12 decimal digits'
    WHEN types IS NULL OR types[1] <> 'OBJECT' THEN 'metadata: not a JSON object'
    WHEN len(keys) > $keys_max THEN 'metadata: too many keys'
    WHEN NOT list_bool_and(list_transform(keys, lambda k: length(k) BETWEEN 1 AND $key_max
            AND NOT contains(k, '.') AND NOT contains(k, chr(0))))
        THEN 'metadata: a key is empty, too long or holds a "." or NUL'
    WHEN cost IS DISTINCT FROM CASE WHEN cost_amount IS NOT NULL THEN
            json_object('amount', cost_amount, 'currency', 'usd') END
        THEN 'metadata._cost: not {{"amount": cost_amount, "currency": "usd"}}'
    WHEN coalesce(types[2], 'OBJECT') <> 'OBJECT' THEN 'metadata._llm: not an object'
    END AS reason
FROM (
    SELECT *, CASE WHEN types[1] = 'OBJECT' THEN json_keys(metadata) END AS keys,
           CASE WHEN types[1] = 'OBJECT' THEN json_extract(metadata, '$._cost') END AS cost
    -- Each JSON function parses the value anew (most of this query's cost): the root's and
    -- _llm's types from one parse, which also says whether it is JSON (null if not: TRY).
    FROM (SELECT *, TRY(json_type(metadata, ['$', '$._llm'])) AS types FROM batch)
)
"""  # noqa: S608 - fixed text, values bound
