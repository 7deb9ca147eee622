"""Kafka records to store columns (in a thread of the core: Arrow, zstd and DuckDB work).

Columnar records (`meters.columnar`, what edges write) are read as they are and checked again
on whole columns; a record that cannot be read is rejected whole, a row that breaks a rule is
rejected alone. JSON records (`meters.records`, one event each, what any producer may write) go
through the compiled validator together, and only when one of them fails through the exact
validator, which names each bad record's reason. CloudEvent records (`meters.events.cloudevents`,
structured or binary mode) become JSON records first; their reasons name the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store import row_problems
from meters import columnar
from meters.events import COLUMNS, EventRules, cloudevents, to_table
from meters.events.compiled import record_validator
from meters.events.schema import OPTIONAL_FIELDS, TIMESTAMP
from meters.records import Record, Undecodable, decode_records
from meters.times import us_to_iso

_INT64 = pa.int64()
# How far past the record size limit a columnar record's stream may expand when decompressed.
_EXPANSION = 16


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What cannot be applied: the record at `position` of the fetched batch, or only its row
    `row` (a columnar record's), which is then sent as a JSON record (`value`)."""

    position: int
    reason: str
    row: int | None = None
    value: bytes | None = None


def decode_batch(
    values: list[bytes | None],
    timestamps_ms: list[int],
    headers: list[columnar.Headers],
    now: int,
    rules: EventRules,
    max_bytes: int,
    check_rows: bool = True,
) -> tuple[pa.Table, list[DeadLetter]]:
    """Records to store columns (`COLUMNS`, organization_id, ingested_at, and the `position`
    and `row` each came from, in log order), and what cannot be applied. Without
    `check_rows`, a columnar record's rows are not checked again (`row_problems`): for a
    journal entry's records, whose appending core checked them and named the rows it left
    out."""
    dead: list[DeadLetter] = []
    tables: list[pa.Table] = []
    readable: list[tuple[int, columnar.Columnar]] = []
    json_positions = []
    json_values: list[bytes | None] = []
    cloud_positions: set[int] = set()
    for i, record_headers in enumerate(headers):
        if not columnar.is_columnar(record_headers):
            value = values[i]
            if cloudevents.is_record(record_headers, value):
                converted = cloudevents.record_value(record_headers, value)
                if isinstance(converted, str):
                    dead.append(DeadLetter(i, converted))
                    continue
                value = converted
                cloud_positions.add(i)
            json_positions.append(i)
            json_values.append(value)
            continue
        # Edges write streams of about 1 MiB (`KafkaSettings.max_record_bytes`).
        read = columnar.read(values[i], record_headers, _EXPANSION * max_bytes)
        if isinstance(read, str):
            dead.append(DeadLetter(i, read))
        else:
            readable.append((i, read))
    if readable:
        table, rejected = (
            _checked(_located(readable), now, rules) if check_rows else (_located(readable), [])
        )
        tables.append(table)
        dead += rejected
    if json_positions:
        table, rejected = _json(
            json_positions,
            json_values,
            [timestamps_ms[i] for i in json_positions],
            now,
            rules,
            max_bytes,
        )
        tables.append(table)
        dead += [
            replace(d, reason=cloudevents.record_reason(d.reason))
            if d.position in cloud_positions
            else d
            for d in rejected
        ]
    # Each kind's rows are in log order already; only both kinds together need sorting.
    if len(tables) > 1:
        events = pa.concat_tables(tables).sort_by([("position", "ascending"), ("row", "ascending")])
    else:
        events = tables[0] if tables else _empty()
    return events, sorted(dead, key=lambda d: (d.position, d.row or 0))


def _located(readable: list[tuple[int, columnar.Columnar]]) -> pa.Table:
    """Columnar records' events (at those positions, in order) with their organization,
    ingest time, position and row: one column each for all of them, no value per row in
    Python."""
    counts = np.fromiter((r.events.num_rows for _, r in readable), np.int64, len(readable))
    record = np.repeat(np.arange(len(readable)), counts)  # each row's record, in `readable`
    starts = np.cumsum(counts) - counts
    table = _origin(
        pa.concat_tables([r.events for _, r in readable]),
        pa.array([r.organization_id for _, r in readable], pa.string()).take(record),
        pa.array(np.array([r.ingested_at_us for _, r in readable], np.int64)[record], TIMESTAMP),
    )
    positions = np.fromiter((p for p, _ in readable), np.int64, len(readable))[record]
    return _placed(
        table,
        pa.array(positions, _INT64),
        pa.array(np.arange(len(record)) - starts[record], _INT64),
    )


def _origin(
    events: pa.Table, organization_ids: pa.Array[Any], ingested_at: pa.Array[Any]
) -> pa.Table:
    """`events` with each one's organization and ingest time."""
    table = events.append_column("organization_id", organization_ids)
    return table.append_column("ingested_at", ingested_at)


def _placed(
    events: pa.Table, positions: pa.Array[Any], rows: pa.Array[Any] | None = None
) -> pa.Table:
    """`events` with the position in the fetched batch of the record each came from, and its
    row in that record (None: a JSON record, one event)."""
    table = events.append_column("position", positions)
    placed = pa.nulls(len(positions), _INT64) if rows is None else rows
    return table.append_column("row", placed)


def _checked(table: pa.Table, now: int, rules: EventRules) -> tuple[pa.Table, list[DeadLetter]]:
    """The rows of columnar records that pass `row_problems`, and the others as dead letters
    (each its row as a JSON record)."""
    problems = row_problems(table.select(COLUMNS.names), now, rules)
    if problems.null_count == table.num_rows:
        return table, []
    bad = pc.is_valid(problems)
    return table.filter(pc.invert(bad)), dead_rows(table.filter(bad), problems.filter(bad))


def dead_rows(rows: pa.Table, reasons: pa.Array[Any]) -> list[DeadLetter]:
    """Dead letters for `rows` (store columns with `position` and `row`), one per reason: a
    columnar record's row alone, sent as a JSON record; a JSON record whole."""
    return [
        DeadLetter(row["position"], str(reason))
        if row["row"] is None
        else DeadLetter(row["position"], str(reason), row["row"], _row_record(row))
        for row, reason in zip(_plain_times(rows).to_pylist(), reasons.to_pylist(), strict=True)
    ]


def _json(
    positions: list[int],
    values: list[bytes | None],
    timestamps_ms: list[int],
    now: int,
    rules: EventRules,
    max_bytes: int,
) -> tuple[pa.Table, list[DeadLetter]]:
    if all(v is not None and len(v) <= max_bytes for v in values):
        table = record_validator(rules)(values, timestamps_ms, now)  # type: ignore[arg-type]
        if table is not None:
            return _placed(table, pa.array(positions, _INT64)), []
    results = decode_records(values, timestamps_ms, now_us=now, rules=rules, max_bytes=max_bytes)
    good = [(positions[i], r) for i, r in enumerate(results) if isinstance(r, Record)]
    dead = [
        DeadLetter(positions[i], r.reason)
        for i, r in enumerate(results)
        if isinstance(r, Undecodable)
    ]
    table = _origin(
        to_table([r.event for _, r in good]),
        pa.array([r.organization_id for _, r in good], pa.string()),
        pa.array([r.ingested_at_us for _, r in good], TIMESTAMP),
    )
    return _placed(table, pa.array([p for p, _ in good], _INT64)), dead


def _plain_times(rows: pa.Table) -> pa.Table:
    """Timestamps as integers: a bad row's may lie outside what Python's datetime holds."""
    for field in ("timestamp", "ingested_at"):
        at = rows.schema.get_field_index(field)
        rows = rows.set_column(at, field, rows.column(field).cast(_INT64))
    return rows


def _row_record(row: dict[str, Any]) -> bytes:
    """A row of the store's columns (timestamps as integers, `_plain_times`) as a JSON record:
    how a dead row is sent."""
    value: dict[str, Any] = {"organization_id": row["organization_id"]}
    for field in ("ingested_at", "timestamp"):
        moment = row[field]
        try:
            value[field] = us_to_iso(moment)
        except (OverflowError, TypeError):
            value[field] = moment  # as it came: the reason says what is wrong
    for field in ("name", *OPTIONAL_FIELDS):
        if row.get(field) is not None:
            value[field] = row[field]
    try:
        value["metadata"] = orjson.loads(row["metadata"])
    except (orjson.JSONDecodeError, TypeError):
        value["metadata"] = row["metadata"]  # as it came: the reason says what is wrong
    return orjson.dumps(value)


def _empty() -> pa.Table:
    table = _origin(to_table([]), pa.array([], pa.string()), pa.array([], TIMESTAMP))
    return _placed(table, pa.array([], _INT64))
