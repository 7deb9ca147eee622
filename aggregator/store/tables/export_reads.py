"""What the lakehouse export reads (`aggregator.export`): the current events after a seq as the
exported table's rows, the voided events it may hold, and how far behind it is.

The rows are the stored event with `_cost` and `_llm` as typed columns beside its metadata
(kept whole, as JSON text), its version (an amendment's later versions are 2 and up), and its
day (UTC), by which the table is partitioned with the organization.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from aggregator.store.base.rows import first_row

__all__ = ["SCHEMA", "events_after", "events_between", "lag", "voided", "voided_count"]

Con = duckdb.DuckDBPyConnection

_LLM_TEXTS = ("vendor", "model")
_LLM_TOKENS = ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens")

# The exported table's columns, in order (`events_after` selects them so).
_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("seq", pa.int64()),
    ("organization_id", pa.string()),
    ("day", pa.date32()),
    ("name", pa.string()),
    ("source", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
    ("customer_id", pa.string()),
    ("external_customer_id", pa.string()),
    ("external_member_id", pa.string()),
    ("external_id", pa.string()),
    ("parent_id", pa.string()),
    ("version", pa.int32()),
    ("cost_amount", pa.decimal128(17, 12)),
    ("cost_currency", pa.string()),
    *((f"llm_{k}", pa.string()) for k in _LLM_TEXTS),
    *((f"llm_{k}", pa.int64()) for k in _LLM_TOKENS),
    ("metadata", pa.string()),
]
SCHEMA = pa.schema(_COLUMNS)

_SELECT = (
    "SELECT e.id::VARCHAR, e.seq, e.organization_id::VARCHAR, e.timestamp::DATE,"  # noqa: S608 - fixed text
    " e.name, e.source, e.timestamp, e.ingested_at, e.customer_id::VARCHAR,"
    " e.external_customer_id, e.external_member_id, e.external_id, e.parent_id,"
    " coalesce(v.version, 1)::INTEGER, e.cost_amount,"
    " json_extract_string(e.metadata, '$._cost.currency'),"
    + "".join(f" json_extract_string(e.metadata, '$._llm.{k}')," for k in _LLM_TEXTS)
    + "".join(f" json_extract(e.metadata, '$._llm.{k}')::BIGINT," for k in _LLM_TOKENS)
    + " e.metadata::VARCHAR FROM events e LEFT JOIN event_versions v ON v.id = e.id"
)


def events_after(con: Con, after: int, limit: int) -> pa.Table:
    """The current (not voided) events of every organization after seq `after`, in seq order,
    at most `limit`, as `SCHEMA`'s rows. Their seqs become visible in order: events are stored
    in seq order, and other jobs run with every applied batch stored (`machinery.live`)."""
    return _rows(con, "e.seq > ?", [after], limit)


def events_between(con: Con, start_us: int, end_us: int, after: int, limit: int) -> pa.Table:
    """As `events_after`, of the events whose timestamp is in [start, end) only (a one-off
    export of a range, page by page)."""
    where = "e.seq > ? AND e.timestamp >= make_timestamptz(?) AND e.timestamp < make_timestamptz(?)"
    return _rows(con, where, [after, start_us, end_us], limit)


def _rows(con: Con, where: str, params: list[Any], limit: int) -> pa.Table:
    query = f"{_SELECT} WHERE {where} ORDER BY e.seq LIMIT ?"
    table = con.sql(query, params=[*params, limit]).to_arrow_table()
    return pa.Table.from_arrays(table.columns, schema=SCHEMA)


def voided_count(con: Con) -> int:
    """How many events were ever voided: it grows with each void (the export's cue to look)."""
    row = first_row(con, "SELECT count(*) FROM voided_events")
    return int(row[0]) if row else 0


def voided(con: Con, through: int) -> list[str]:
    """The ids of the voided events of seq `through` or less (an amended event's earlier
    versions among them)."""
    rows = con.execute(
        "SELECT e.id::VARCHAR FROM all_events e SEMI JOIN voided_events v USING (seq)"
        " WHERE e.seq <= ? ORDER BY e.seq",
        [through],
    ).fetchall()
    return [r[0] for r in rows]


def lag(con: Con, after: int) -> tuple[int, int | None]:
    """(current events after seq `after`, the oldest one's ingestion time in microseconds, or
    None if none is)."""
    row = first_row(
        con, "SELECT count(*), epoch_us(min(ingested_at)) FROM events WHERE seq > ?", [after]
    )
    return (int(row[0]), row[1]) if row else (0, None)
