"""Meters: create, get, list, update (each redefinition starts a backfill), and quantities."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import duckdb

from aggregator.errors import MeterFailed, NotFound
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import (
    METER_SORTS,
    Gathered,
    MeterRow,
    Scope,
    Store,
    TenantLimits,
    get_meter,
    subjects,
)
from aggregator.store import customer_tables as customer_sql
from aggregator.store import dimensions as dimension_sql
from aggregator.store import meter_tables as sql
from aggregator.store import quantities as quantity_sql
from meters.definitions import MeterCreate, MeterUpdate
from meters.periods import Interval
from meters.times import now_us

__all__ = [
    "METER_SORTS",
    "Gathered",
    "MeterRow",
    "Quantities",
    "QuantityWindow",
    "create",
    "evaluable",
    "get",
    "list_",
    "partials",
    "update",
]

Con = duckdb.DuckDBPyConnection


@dataclass(frozen=True, slots=True)
class QuantityWindow:
    """The periods asked for: [start, end] (UTC microseconds) cut by `interval` in `tz`."""

    start_us: int
    end_us: int
    interval: Interval
    tz: ZoneInfo


@dataclass(frozen=True, slots=True)
class Quantities:
    periods: list[tuple[datetime, float]]  # (period start, quantity)
    total: float
    # Per group of the dimensions asked (`group_by`): their values, its periods and total;
    # and how many groups past the most an answer holds were folded into one (`OTHER`).
    groups: list[tuple[dict[str, str | None], list[tuple[datetime, float]], float]] | None = None
    other_groups: int = 0


def evaluable(row: MeterRow) -> MeterRow:
    """Refuse to read a failed meter's events (its SQL cannot run; its rollups are stale)."""
    if row.failure is not None:
        raise MeterFailed(
            f"Meter {row.id} cannot be evaluated and is skipped until its filter or aggregation"
            f" is changed (or it is archived and unarchived): {row.failure}"
        )
    return row


def found(row: MeterRow | None) -> MeterRow:
    if row is None:
        raise NotFound("Meter not found")
    return row


async def create(
    store: Store,
    organization_id: str,
    data: MeterCreate,
    limits: TenantLimits,
    *,
    request_id: str | None = None,
) -> MeterRow:
    meter_id = str(uuid.uuid4())
    row: MeterRow = await store.submit(
        record(
            "meter.create",
            organization_id,
            request_id,
            {"limits": limits, "meter_id": meter_id},
            data=data,
        )
    )
    return row


async def get(store: Store, organization_id: str, meter_id: str) -> MeterRow:
    return found(await store.read(get_meter, organization_id, meter_id))


async def update(
    store: Store,
    organization_id: str,
    meter_id: str,
    data: MeterUpdate,
    limits: TenantLimits,
    *,
    request_id: str | None = None,
) -> MeterRow:
    found(await store.read(get_meter, organization_id, meter_id))
    row: MeterRow = await store.submit(
        record(
            "meter.update",
            organization_id,
            request_id,
            {"limits": limits},
            meter_id=meter_id,
            data=data,
        )
    )
    return row


async def list_(
    store: Store,
    organization_id: str,
    *,
    query: str | None,
    is_archived: bool | None,
    metadata: list[tuple[str, list[str]]],
    sorting: list[str],
    page: int,
    limit: int,
) -> Page[MeterRow]:
    def run(con: Con) -> Page[MeterRow]:
        rows, total = sql.list_meters(
            con,
            organization_id,
            query=query,
            is_archived=is_archived,
            metadata=metadata,
            sorting=sorting,
            limit=limit,
            offset=offset(page, limit),
        )
        return Page(rows, total)

    return await store.read(run)


def _subjects(
    con: Con, organization_id: str, ids: tuple[str, ...], external: tuple[str, ...]
) -> tuple[str, ...] | None:
    """Customer filters as rollup subjects: every id and external id of each customer."""
    if not ids and not external:
        return None
    customers = customer_sql.customers_by_refs(con, organization_id, list(ids), list(external))
    names = {subjects.of_id(i) for i in ids} | {subjects.of_external(e) for e in external}
    names |= {s for c in customers for s in subjects.of_customer(c)}
    return tuple(sorted(names))


def quantities(
    meter: MeterRow, gathered: Gathered, across: str | None, group_by: tuple[str, ...]
) -> Quantities:
    """What `partials` gathered (and the other shards', merged) as quantities: each period's
    and the window's, and each group's if `group_by` was asked."""
    if not group_by:
        return Quantities(*gathered.reduced(meter, across))
    found, folded = gathered.groups(meter)
    groups = [
        (
            dict(zip(group_by, dimension_sql.group_of(key, len(group_by)), strict=True)),
            series,
            total,
        )
        for key, series, total in found
    ]
    return Quantities(*gathered.reduced(meter, across), groups, folded)


async def partials(
    store: Store,
    organization_id: str,
    meter_id: str,
    window: QuantityWindow,
    *,
    customer_ids: tuple[str, ...],
    external_customer_ids: tuple[str, ...],
    metadata: tuple[tuple[str, tuple[str, ...]], ...],
    by_customer: bool,
    group_by: tuple[str, ...] = (),
    dimensions: tuple[tuple[str, tuple[str, ...]], ...] = (),
) -> tuple[MeterRow, Gathered]:
    """The meter and its partials over the periods of `window` and over all of it, for the
    customers named (all if none), per customer if `by_customer`, or per group of the
    meter's dimensions `group_by`, of the events with the `dimensions` values asked (if any):
    what the route reduces to quantities, and what the shards of a deployment merge before
    reducing."""

    now = now_us()  # an integral meter's period not over yet counts up to now

    def run(con: Con) -> tuple[MeterRow, Gathered]:
        meter = evaluable(found(get_meter(con, organization_id, meter_id)))
        dimension_sql.declared(meter, group_by, dimensions)
        subjects = _subjects(con, organization_id, customer_ids, external_customer_ids)
        scope = Scope(meter, subjects, metadata, by_customer, group_by, dimensions)
        return meter, quantity_sql.gather(
            con, scope, window.start_us, window.end_us, window.interval, window.tz, now
        )

    return await store.read(run)
