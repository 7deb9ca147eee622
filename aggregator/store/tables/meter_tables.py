"""SQL for meter definitions: create, update (writer jobs) and reads."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import orjson
import pyarrow as pa
from pydantic import TypeAdapter

from aggregator.errors import NotFound
from aggregator.store.base.meter_sql import member_pointer
from aggregator.store.base.rows import first_row, is_uuid, rollback, transaction
from aggregator.store.machinery import rollups
from aggregator.store.machinery.compaction import LEDGER_TABLES, ROLLUP_TABLES
from aggregator.store.machinery.writer import Job, Repairable, Tx
from aggregator.store.tables import quotas
from aggregator.store.tables.quotas import TenantLimits
from meters.aggregations import (
    Aggregation,
    CountAggregation,
    PropertyAggregation,
    UniqueAggregation,
)
from meters.definitions import MeterCreate, MeterUpdate, unit_errors
from meters.errors import FieldError, ValidationFailed
from meters.filters import STORED, Filter
from meters.times import now_us as clock_us

if TYPE_CHECKING:
    pass

_AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)
log = logging.getLogger(__name__)
# A failure counts only for the version it was found in: a redefinition starts afresh.
_FAILURE = (
    "(SELECT {} FROM meter_failures f WHERE f.meter_id = meters.id AND f.version = meters.version)"
)
_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, name, unit, custom_label, custom_multiplier,"
    " filter, aggregation, metadata, epoch_us(created_at), epoch_us(modified_at),"
    " epoch_us(archived_at), version, backfill_target, backfilled_to, backfill_events,"
    " backfilled_events, "
    + _FAILURE.format("reason")
    + ", "
    + _FAILURE.format("epoch_us(failed_at)")
)
# Errors that a meter's definition (or the events it meets) causes every time: the meter is
# marked failed. Others (out of memory, I/O, interrupts) fail the job as usual, to be retried.
EVALUATION_ERRORS = (
    duckdb.BinderException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.InvalidTypeException,
    duckdb.NotImplementedException,
    duckdb.OutOfRangeException,
    duckdb.ParserException,
    duckdb.TypeMismatchException,
)
# Longest failure reason kept (DuckDB's messages can quote a whole statement).
_MAX_REASON = 500
# What a (re)definition's backfill will read: the organization's stored user events.
_EVENTS_TO_BACKFILL = (
    "(SELECT count(*) FROM events e WHERE e.organization_id = {} AND e.source = 'user')"
)


@dataclass(frozen=True, slots=True)
class MeterRow:
    id: str
    organization_id: str
    name: str
    unit: str
    custom_label: str | None
    custom_multiplier: int | None
    filter: Filter
    aggregation: CountAggregation | PropertyAggregation | UniqueAggregation
    metadata: dict[str, Any]
    created_at_us: int
    modified_at_us: int | None
    archived_at_us: int | None
    version: int
    backfill_target: int  # seq bounds: what the backfill steps through
    backfilled_to: int
    backfill_events: int  # the same progress in the organization's events (what users see)
    backfilled_events: int
    # Why the meter cannot be evaluated (skipped by ingest until redefined), and since when.
    failure: str | None = None
    failed_at_us: int | None = None

    @property
    def backfilling(self) -> bool:
        return self.failure is None and self.backfilled_to < self.backfill_target


@functools.lru_cache(maxsize=4096)
def _definition(
    filter_json: str, aggregation_json: str
) -> tuple[Filter, CountAggregation | PropertyAggregation | UniqueAggregation]:
    """Parsed definitions, cached: validating them costs ~1 ms, more than reading the row.
    (Both are immutable models, safe to share.) Parsed as stored: a definition accepted by an
    earlier version still loads; if it cannot be evaluated, the meter is marked failed."""
    return (
        Filter.model_validate_json(filter_json, context=STORED),
        _AGGREGATION.validate_json(aggregation_json, context=STORED),
    )


def _row(r: tuple[Any, ...]) -> MeterRow:
    return MeterRow(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        *_definition(r[6], r[7]),
        orjson.loads(r[8]),
        r[9],
        r[10],
        r[11],
        r[12],
        r[13],
        r[14],
        r[15],
        r[16],
        r[17],
        r[18],
    )


_ACTIVE_METERS = (
    "SELECT count(*) FROM meters WHERE organization_id = ?::UUID AND archived_at IS NULL"
)


def create_job(
    organization_id: str, data: MeterCreate, now_us: int, limits: TenantLimits = quotas.DEFAULTS
) -> Job[MeterRow]:
    def job(tx: Tx) -> MeterRow:
        con = tx.con
        quotas.check(con, limits, quotas.METERS, _ACTIVE_METERS, [organization_id])
        meter_id = str(uuid.uuid4())
        con.execute(
            "INSERT INTO meters (id, organization_id, name, unit, custom_label,"  # noqa: S608 - fixed text, values bound
            " custom_multiplier, filter, aggregation, metadata, created_at, backfill_target,"
            " backfill_events) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, make_timestamptz(?),"
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
        redefined = (data.filter is not None and data.filter != current.filter) or (
            data.aggregation is not None and data.aggregation != current.aggregation
        )
        if redefined or (archiving and not data.is_archived):
            # New semantics, or events missed while archived: rebuild the rollups from the
            # stored events (backfill); live ingest keeps them current from now on.
            _reset_rollups(con, meter_id)
            tx.live.stage(lambda: tx.live.balances.drop(meter_id))
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
        tx.live.stage(lambda: tx.live.catalog.forget_meter(meter_id))
        return _found(con, organization_id, meter_id)

    return job


def _reset_rollups(con: duckdb.DuckDBPyConnection, meter_id: str) -> None:
    """Forget what the meter aggregated (the backfill rebuilds it), and why it failed; its
    customers' credits and resets stay."""
    for table in (*ROLLUP_TABLES, *LEDGER_TABLES, "meter_failures"):
        # Table names from this fixed list only.
        con.execute(f"DELETE FROM {table} WHERE meter_id = ?::UUID", [meter_id])  # noqa: S608 - fixed text, values bound


def meters_of(con: duckdb.DuckDBPyConnection, organization_ids: list[str]) -> list[MeterRow]:
    """The organizations' meters that ingest keeps current: not archived, not failed."""
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM meters WHERE archived_at IS NULL"  # noqa: S608 - fixed text, values bound
        " AND organization_id IN (SELECT unnest(?::UUID[]))",
        [organization_ids],
    ).fetchall()
    return [meter for meter in map(_row, rows) if meter.failure is None]


def failed_meters(con: duckdb.DuckDBPyConnection) -> list[MeterRow]:
    """Every meter skipped because it cannot be evaluated (for /metrics)."""
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM meters WHERE archived_at IS NULL"  # noqa: S608 - fixed text, values bound
        " AND id IN (SELECT meter_id FROM meter_failures)"
    ).fetchall()
    return [meter for meter in map(_row, rows) if meter.failure is not None]


class MeterUnevaluable(Repairable):
    """Evaluating `meters` over some events failed in DuckDB. The repair finds which of them
    fail (each `probe`d alone in a transaction rolled back) and marks those failed, so that
    the job, run again, commits its events without them."""

    def __init__(
        self,
        meters: Sequence[MeterRow],
        reason: str,
        probe: Callable[[duckdb.DuckDBPyConnection, MeterRow], None],
    ) -> None:
        super().__init__(reason)
        self.meters = list(meters)
        self.reason = reason
        self.probe = probe

    def repair(self, con: duckdb.DuckDBPyConnection, now_us: int) -> bool:
        failing: list[tuple[MeterRow, str]] = []
        if len(self.meters) == 1:
            failing.append((self.meters[0], self.reason))
        else:
            for meter in self.meters:
                con.execute("BEGIN TRANSACTION")
                try:
                    self.probe(con, meter)
                except EVALUATION_ERRORS as exc:
                    failing.append((meter, str(exc)))
                finally:
                    rollback(con)
        if not failing:
            return False
        with transaction(con):
            for meter, reason in failing:
                log.error(
                    "meter %s (organization %s) cannot be evaluated; ingest skips it until it"
                    " is redefined: %s",
                    meter.id,
                    meter.organization_id,
                    reason,
                )
                con.execute(
                    "INSERT INTO meter_failures VALUES (?::UUID, ?, ?, make_timestamptz(?))"
                    " ON CONFLICT DO UPDATE SET version = excluded.version,"
                    " reason = excluded.reason, failed_at = excluded.failed_at",
                    [meter.id, meter.version, reason[:_MAX_REASON], now_us],
                )
        return True


def apply_isolated(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
    *,
    at_us: int,
    data: pa.Table | None = None,
    backfill: bool = False,
) -> rollups.Evaluated:
    """`rollups.evaluate`, raising MeterUnevaluable when DuckDB cannot evaluate the meters (the
    writer then marks the failing ones and runs the job again without them). `data` is the
    Arrow table registered as `source`, if it is one (the probes need it after the failed
    transaction has let go of the registration)."""

    def evaluate(con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow]) -> rollups.Evaluated:
        return rollups.evaluate(con, meters, source, where, params, at_us=at_us, backfill=backfill)

    try:
        return evaluate(con, meters)
    except EVALUATION_ERRORS as exc:

        def probe(probe_con: duckdb.DuckDBPyConnection, meter: MeterRow) -> None:
            if data is None:
                evaluate(probe_con, [meter])
                return
            probe_con.register(source, data)
            try:
                evaluate(probe_con, [meter])
            finally:
                probe_con.unregister(source)

        raise MeterUnevaluable(meters, str(exc), probe) from exc


def pending_backfills(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """(meter id, version) of every meter whose backfill is not finished."""
    rows = con.execute(
        "SELECT id::VARCHAR, version FROM meters"  # noqa: S608 - fixed text, values bound
        " WHERE archived_at IS NULL AND backfilled_to < backfill_target AND "
        + _FAILURE.format("reason")
        + " IS NULL"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def backfill_step_job(meter_id: str, version: int, chunk: int) -> Job[tuple[int, int] | None]:
    """A writer job adding the next `chunk` of stored events (by seq) to the meter's rollups;
    returns (done, target), or None when stale (the meter was redefined or archived since)."""

    def job(tx: Tx) -> tuple[int, int] | None:
        con = tx.con
        row = first_row(con, f"SELECT {_COLUMNS} FROM meters WHERE id = ?::UUID", [meter_id])  # noqa: S608 - fixed text, values bound
        if row is None:
            return None
        meter = _row(row)
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
            at_us=clock_us(),
            backfill=True,
        )
        rollups.store(con, [evaluated])
        tx.live.stage(lambda: tx.live.add_usage(evaluated))
        con.execute(
            "UPDATE meters SET backfilled_to = ?, backfilled_events = backfilled_events + ?"
            " WHERE id = ?::UUID",
            # One row per event of the chunk, in the meter or not: the events read.
            [high, evaluated.values.num_rows, meter_id],
        )
        return (high, meter.backfill_target)

    return job


def _found(con: duckdb.DuckDBPyConnection, organization_id: str, meter_id: str) -> MeterRow:
    meter = get_meter(con, organization_id, meter_id)
    if meter is None:
        raise NotFound("Meter not found")
    return meter


def get_meter(
    con: duckdb.DuckDBPyConnection, organization_id: str, meter_id: str
) -> MeterRow | None:
    if not is_uuid(meter_id):
        return None
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM meters WHERE organization_id = ? AND id = ?::UUID",  # noqa: S608 - fixed text, values bound
        [organization_id, meter_id],
    )
    return _row(row) if row else None


def meters_by_ids(
    con: duckdb.DuckDBPyConnection, organization_id: str, meter_ids: Sequence[str]
) -> dict[str, MeterRow]:
    """The organization's meters of `meter_ids`, by id, in one statement (those not found are
    absent)."""
    wanted = sorted({m for m in meter_ids if is_uuid(m)})
    if not wanted:
        return {}
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM meters WHERE organization_id = ?"  # noqa: S608 - fixed text, values bound
        " AND id IN (SELECT unnest(?::UUID[]))",
        [organization_id, wanted],
    ).fetchall()
    return {meter.id: meter for meter in map(_row, rows)}


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
        f"SELECT {_COLUMNS} FROM meters WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608 - fixed text, values bound
        [*params, limit, offset],
    ).fetchall()
    return [_row(r) for r in rows], int(total)
