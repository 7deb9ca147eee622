"""SQL for meter definitions: create, update (writer jobs) and reads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import duckdb
import orjson
from pydantic import TypeAdapter

from aggregator.errors import NotFound
from aggregator.store.base.meter_rows import (
    COLUMNS,
    FAILURE,
    MeterRow,
    get_meter,
    meter_row,
)
from aggregator.store.base.rows import first_row, is_uuid
from aggregator.store.engine.balances import MeterDropped
from aggregator.store.engine.segments import ROLLUP_RELATIONS
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering.evaluation import apply_isolated
from aggregator.store.metering.meter_sql import member_pointer
from aggregator.store.tables import quotas
from aggregator.store.tables.quotas import TenantLimits
from meters.aggregations import (
    Aggregation,
)
from meters.definitions import MeterCreate, MeterUpdate, dimensions_error, unit_errors
from meters.errors import FieldError, ValidationFailed

if TYPE_CHECKING:
    pass

__all__ = [
    "METER_SORTS",
    "backfill_step_job",
    "create_job",
    "failed_meters",
    "list_meters",
    "meters_by_ids",
    "pending_backfills",
    "update_job",
]

_AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)
log = logging.getLogger(__name__)
# What a (re)definition's backfill will read: the organization's stored user events.
_EVENTS_TO_BACKFILL = (
    "(SELECT count(*) FROM events e WHERE e.organization_id = {} AND e.source = 'user')"
)


_ACTIVE_METERS = (
    "SELECT count(*) FROM meters WHERE organization_id = ?::UUID AND archived_at IS NULL"
)


def create_job(
    organization_id: str,
    data: MeterCreate,
    now_us: int,
    limits: TenantLimits = quotas.DEFAULTS,
    *,
    meter_id: str,
) -> Job[MeterRow]:
    def job(tx: Tx) -> MeterRow:
        con = tx.con
        quotas.check(con, limits, quotas.METERS, _ACTIVE_METERS, [organization_id])
        con.execute(
            "INSERT INTO meters (id, organization_id, name, unit, custom_label,"  # noqa: S608 - fixed text, values bound
            " custom_multiplier, filter, aggregation, dimensions, metadata, created_at,"
            " backfill_target, backfill_events) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " make_timestamptz(?),"
            " (SELECT coalesce(max(seq), 0) FROM events), "
            + _EVENTS_TO_BACKFILL.format("?::UUID")
            + ")",
            [
                meter_id,
                organization_id,
                data.name,
                data.unit,
                data.custom_label,
                data.custom_multiplier,
                data.filter.model_dump_json(),
                _AGGREGATION.dump_json(data.aggregation).decode(),
                data.dimensions,
                orjson.dumps(data.metadata).decode(),
                now_us,
                organization_id,
            ],
        )
        return _found(con, organization_id, meter_id)

    return job


def _unit_changes(changes: dict[str, Any], current: MeterRow) -> dict[str, Any]:
    """`changes`, with a unit made non-custom dropping the label and multiplier it leaves
    unset; 422 unless the meter they make keeps Polar's unit rules. A patch that leaves the
    unit fields alone is not checked (meters stored before the rules keep working)."""
    fields = ("unit", "custom_label", "custom_multiplier")
    if not any(f in changes for f in fields):
        return changes
    unit = changes.get("unit") or current.unit
    if unit != "custom":
        changes = {"custom_label": None, "custom_multiplier": None, **changes}
    merged = {f: changes.get(f, getattr(current, f)) for f in fields[1:]}
    errors = unit_errors(unit, merged["custom_label"], merged["custom_multiplier"])
    if errors:
        raise ValidationFailed(
            [FieldError("value_error", ("body", f), m, merged[f]) for f, m in errors]
        )
    return changes


def _dimension_changes(data: MeterUpdate, current: MeterRow) -> list[str] | None:
    """The dimensions `data` sets, if it changes them (their order too: it is theirs); 422
    naming `dimensions` unless the meter the patch makes may have its dimensions. A patch that
    leaves both alone is not checked."""
    if data.dimensions is None and data.aggregation is None:
        return None
    dimensions = current.dimensions if data.dimensions is None else tuple(data.dimensions)
    func = (data.aggregation or current.aggregation).func
    error = dimensions_error(func, dimensions)
    if error is not None:
        raise ValidationFailed(
            [FieldError("value_error", ("body", "dimensions"), error, list(dimensions))]
        )
    return None if dimensions == current.dimensions else list(dimensions)


def update_job(
    organization_id: str,
    meter_id: str,
    data: MeterUpdate,
    now_us: int,
    limits: TenantLimits = quotas.DEFAULTS,
) -> Job[MeterRow]:
    def job(tx: Tx) -> MeterRow:
        con = tx.con
        current = _found(con, organization_id, meter_id)
        changes = _unit_changes(data.model_dump(exclude_unset=True), current)
        columns: dict[str, Any] = {}
        for key in ("name", "unit", "custom_label", "custom_multiplier"):
            if key in changes and (changes[key] is not None or key.startswith("custom_")):
                columns[key] = changes[key]
        if data.filter is not None:
            columns["filter"] = data.filter.model_dump_json()
        if data.aggregation is not None:
            columns["aggregation"] = _AGGREGATION.dump_json(data.aggregation).decode()
        dimensions = _dimension_changes(data, current)
        if dimensions is not None:
            columns["dimensions"] = dimensions
        if data.metadata is not None:
            columns["metadata"] = orjson.dumps(data.metadata).decode()
        extra = ""
        extra_params: list[Any] = []
        archiving = data.is_archived is not None and data.is_archived != (
            current.archived_at_us is not None
        )
        if archiving:
            if not data.is_archived:
                quotas.check(con, limits, quotas.METERS, _ACTIVE_METERS, [organization_id])
            extra = ", archived_at = " + ("make_timestamptz(?)" if data.is_archived else "NULL")
            extra_params = [now_us] if data.is_archived else []
        redefined = (
            (data.filter is not None and data.filter != current.filter)
            or (data.aggregation is not None and data.aggregation != current.aggregation)
            or dimensions is not None
        )
        if redefined or (archiving and not data.is_archived):
            # New semantics, or events missed while archived: rebuild the rollups from the
            # stored events (backfill); live ingest keeps them current from now on.
            _reset_rollups(tx, meter_id)
            tx.live.change_ledger(tx.con, MeterDropped(meter_id))
            extra += (
                ", version = version + 1, backfilled_to = 0, backfilled_events = 0,"  # noqa: S608 - fixed text
                " backfill_target = (SELECT coalesce(max(seq), 0) FROM events),"
                " backfill_events = " + _EVENTS_TO_BACKFILL.format("meters.organization_id")
            )
        if not columns and not extra:
            return current
        # Column names come from the model's fields above, never from the request.
        assignments = "".join(f"{key} = ?, " for key in columns)
        con.execute(
            f"UPDATE meters SET {assignments}modified_at = make_timestamptz(?){extra}"  # noqa: S608 - fixed text, values bound
            " WHERE organization_id = ? AND id = ?::UUID",
            [*columns.values(), now_us, *extra_params, organization_id, meter_id],
        )
        _forget(tx, meter_id)
        return _found(con, organization_id, meter_id)

    return job


def _reset_rollups(tx: Tx, meter_id: str) -> None:
    """Forget what the meter aggregated (the backfill rebuilds it), and why it failed; its
    customers' credits and resets stay."""
    for relation in ROLLUP_RELATIONS:
        tx.live.delete_rows(tx.con, relation, "meter_id = ?::UUID", [meter_id])
    tx.con.execute("DELETE FROM meter_failures WHERE meter_id = ?::UUID", [meter_id])


def failed_meters(con: duckdb.DuckDBPyConnection) -> list[MeterRow]:
    """Every meter skipped because it cannot be evaluated (for /metrics)."""
    rows = con.execute(
        f"SELECT {COLUMNS} FROM meters WHERE archived_at IS NULL"  # noqa: S608 - fixed text, values bound
        " AND id IN (SELECT meter_id FROM meter_failures)"
    ).fetchall()
    return [meter for meter in map(meter_row, rows) if meter.failure is not None]


def pending_backfills(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """(meter id, version) of every meter whose backfill is not finished."""
    rows = con.execute(
        "SELECT id::VARCHAR, version FROM meters"  # noqa: S608 - fixed text, values bound
        " WHERE archived_at IS NULL AND backfilled_to < backfill_target AND "
        + FAILURE.format("reason")
        + " IS NULL"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def backfill_step_job(meter_id: str, version: int, chunk: int) -> Job[tuple[int, int] | None]:
    """A writer job adding the next `chunk` of stored events (by seq) to the meter's rollups,
    their ledger usage applied at the time of the meter's definition (the write that asked for
    the backfill: the same on every core, whenever its background work gets there); returns
    (done, target), or None when stale (the meter was redefined or archived since)."""

    def job(tx: Tx) -> tuple[int, int] | None:
        con = tx.con
        row = first_row(con, f"SELECT {COLUMNS} FROM meters WHERE id = ?::UUID", [meter_id])  # noqa: S608 - fixed text, values bound
        if row is None:
            return None
        meter = meter_row(row)
        if meter.version != version or meter.archived_at_us is not None or meter.failure:
            return None
        if not meter.backfilling:
            return (meter.backfilled_to, meter.backfill_target)
        high = min(meter.backfilled_to + chunk, meter.backfill_target)
        evaluated = apply_isolated(
            con,
            [meter],
            "events",
            "organization_id = ?::UUID AND seq > ? AND seq <= ? AND source = 'user'",
            [meter.organization_id, meter.backfilled_to, high],
            at_us=meter.modified_at_us or meter.created_at_us,
            backfill=True,
        )
        tx.live.store_contributions(con, [evaluated])
        con.execute(
            "UPDATE meters SET backfilled_to = ?, backfilled_events = backfilled_events + ?"
            " WHERE id = ?::UUID",
            # One row per event of the chunk, in the meter or not: the events read.
            [high, evaluated.keys.num_rows, meter_id],
        )
        _forget(tx, meter_id)
        return (high, meter.backfill_target)

    return job


def _forget(tx: Tx, meter_id: str) -> None:
    """The catalog's copy of a meter this job changes: forgotten now (this transaction reads
    it anew) and at commit (what a reader read before it)."""
    tx.live.catalog.forget_meter(meter_id)
    tx.live.stage(lambda: tx.live.catalog.forget_meter(meter_id))


def _found(con: duckdb.DuckDBPyConnection, organization_id: str, meter_id: str) -> MeterRow:
    meter = get_meter(con, organization_id, meter_id)
    if meter is None:
        raise NotFound("Meter not found")
    return meter


def meters_by_ids(
    con: duckdb.DuckDBPyConnection, organization_id: str, meter_ids: Sequence[str]
) -> dict[str, MeterRow]:
    """The organization's meters of `meter_ids`, by id, in one statement (those not found are
    absent)."""
    wanted = sorted({m for m in meter_ids if is_uuid(m)})
    if not wanted:
        return {}
    rows = con.execute(
        f"SELECT {COLUMNS} FROM meters WHERE organization_id = ?"  # noqa: S608 - fixed text, values bound
        " AND id IN (SELECT unnest(?::UUID[]))",
        [organization_id, wanted],
    ).fetchall()
    return {meter.id: meter for meter in map(meter_row, rows)}


_SORTS = {
    "name": "name ASC, id ASC",
    "-name": "name DESC, id DESC",
    "created_at": "created_at ASC, id ASC",
    "-created_at": "created_at DESC, id DESC",
}
METER_SORTS = frozenset(_SORTS)


def list_meters(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    *,
    query: str | None,
    is_archived: bool | None,
    metadata: list[tuple[str, list[str]]],
    sorting: list[str],
    limit: int,
    offset: int,
) -> tuple[list[MeterRow], int]:
    clauses = ["organization_id = ?"]
    params: list[Any] = [organization_id]
    if query:
        clauses.append("contains(lower(name), lower(?))")
        params.append(query)
    if is_archived is not None:
        clauses.append("archived_at IS NOT NULL" if is_archived else "archived_at IS NULL")
    for key, values in metadata:
        clauses.append("json_extract_string(metadata, ?) IN (SELECT unnest(?::VARCHAR[]))")
        params.extend([member_pointer(key), values])
    where = " AND ".join(clauses)
    total = con.execute(f"SELECT count(*) FROM meters WHERE {where}", params).fetchall()[0][0]  # noqa: S608 - fixed text, values bound
    order = ", ".join(_SORTS[s] for s in sorting)
    rows = con.execute(
        f"SELECT {COLUMNS} FROM meters WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608 - fixed text, values bound
        [*params, limit, offset],
    ).fetchall()
    return [meter_row(r) for r in rows], int(total)
