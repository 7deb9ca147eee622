"""The meters table's rows, as metering, the engine and the tables read them: a meter's
definition parsed once (`MeterRow`), and the reads that applying events needs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson
from pydantic import TypeAdapter

from aggregator.store.base.rows import first_row, is_uuid
from meters.aggregations import (
    Aggregation,
    CountAggregation,
    IntegralAggregation,
    PropertyAggregation,
    UniqueAggregation,
)
from meters.errors import FieldError
from meters.filters import STORED, Filter

_AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)
# A failure counts only for the version it was found in: a redefinition starts afresh.
FAILURE = (
    "(SELECT {} FROM meter_failures f WHERE f.meter_id = meters.id AND f.version = meters.version)"
)
COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, name, unit, custom_label, custom_multiplier,"
    " filter, aggregation, metadata, epoch_us(created_at), epoch_us(modified_at),"
    " epoch_us(archived_at), version, backfill_target, backfilled_to, backfill_events,"
    f" backfilled_events, {FAILURE.format('reason')}, {FAILURE.format('epoch_us(failed_at)')},"
    " dimensions"
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
    # The metadata properties that split its usage (`meters.definitions`), in their order. A
    # default, so that a write's outcome stored by the previous main (`command_outcomes`, kept
    # a day: a resend answers it) still reads back.
    dimensions: tuple[str, ...] = ()
    # Why the meter cannot be evaluated (skipped by ingest until redefined), and since when.
    failure: str | None = None
    failed_at_us: int | None = None

    @property
    def backfilling(self) -> bool:
        return self.failure is None and self.backfilled_to < self.backfill_target


# More than an organization's meters (an LRU cache smaller than the list read over and over
# misses every time): 5,000 meters took 0.6 s to read again after each change of one.
@functools.lru_cache(maxsize=1 << 16)
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


def meter_row(r: tuple[Any, ...]) -> MeterRow:
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
        tuple(r[19]),
        r[17],
        r[18],
    )


def meters_of(con: duckdb.DuckDBPyConnection, organization_ids: list[str]) -> list[MeterRow]:
    """The organizations' meters that ingest keeps current: not archived, not failed."""
    rows = con.execute(
        f"SELECT {COLUMNS} FROM meters WHERE archived_at IS NULL"  # noqa: S608 - fixed text, values bound
        " AND organization_id IN (SELECT unnest(?::UUID[]))",
        [organization_ids],
    ).fetchall()
    return [meter for meter in map(meter_row, rows) if meter.failure is None]


def get_meter(
    con: duckdb.DuckDBPyConnection, organization_id: str, meter_id: str
) -> MeterRow | None:
    if not is_uuid(meter_id):
        return None
    row = first_row(
        con,
        f"SELECT {COLUMNS} FROM meters WHERE organization_id = ? AND id = ?::UUID",  # noqa: S608 - fixed text, values bound
        [organization_id, meter_id],
    )
    return meter_row(row) if row else None


def without_ledger(meter: MeterRow) -> FieldError | None:
    """Why `meter` has no customer meters (credits, resets, plans, holds, alerts), if so: an
    integral's consumption grows between events, where a balance changes only with a write
    (so that every check and every replica sees one value); bill it per period instead."""
    if not isinstance(meter.aggregation, IntegralAggregation):
        return None
    return FieldError(
        "meter_aggregation",
        ("body", "meter_id"),
        "An integral meter has no balance: its usage grows between events. Read its"
        " quantities per period instead.",
        meter.id,
    )
