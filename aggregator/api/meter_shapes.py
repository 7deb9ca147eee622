"""Meters as polar-sdk's `Meter` loads them (plus meterline's `dimensions`, `backfill` and
`failure`), and their quantities; created from `MeterCreate`, updated from `MeterUpdate`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NotRequired

from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.meter_service import Gathered, MeterRow, Quantities
from aggregator.services.pages import Page
from meters.aggregations import NEVER_US, Partial
from meters.definitions import MeterCreate, MeterUpdate

__all__ = [
    "MeterCreate",
    "MeterShape",
    "MeterUpdate",
    "gathered",
    "meter",
    "meters",
    "partials",
    "quantities",
]


class BackfillShape(TypedDict):
    status: Literal["running", "done"]
    # The organization's events stored before the (re)definition, and those rolled up so far.
    events_done: int
    events_total: int


class FailureShape(TypedDict):
    reason: str
    failed_at: str | None


class MeterShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    metadata: dict[str, Any]
    name: str
    unit: str
    custom_label: str | None
    custom_multiplier: int | None
    filter: dict[str, Any]
    aggregation: dict[str, Any]
    # meterline's own: the metadata properties that split the meter's usage ([] when none).
    dimensions: list[str]
    organization_id: str
    archived_at: str | None
    # meterline's own: how far rollups are built from events stored before the meter's
    # (re)definition. Quantities are complete once status is "done".
    backfill: BackfillShape
    # meterline's own: set when DuckDB cannot evaluate the meter (ingest skips it, its
    # quantities answer 409); redefining or unarchiving it rebuilds it by backfill.
    failure: FailureShape | None


class QuantityShape(TypedDict):
    timestamp: str
    quantity: float


class GroupShape(TypedDict):
    dimensions: dict[str, str | None]  # the group's value of each dimension asked (null: none)
    quantities: list[QuantityShape]
    total: float


class QuantitiesShape(TypedDict):
    quantities: list[QuantityShape]
    total: float
    # meterline's own, only when `group_by` is asked (without it the answer is Polar's): the
    # groups, and how many past the most an answer holds were folded into one, "__other__"
    groups: NotRequired[list[GroupShape]]
    other_groups: NotRequired[int]


def meter(row: MeterRow) -> MeterShape:
    return {
        "id": row.id,
        "created_at": iso(row.created_at_us),
        "modified_at": iso(row.modified_at_us),
        "metadata": row.metadata,
        "name": row.name,
        "unit": row.unit,
        "custom_label": row.custom_label,
        "custom_multiplier": row.custom_multiplier,
        "filter": row.filter.model_dump(mode="json"),
        "aggregation": row.aggregation.model_dump(mode="json"),
        "dimensions": list(row.dimensions),
        "organization_id": row.organization_id,
        "archived_at": iso(row.archived_at_us),
        "backfill": {
            "status": "running" if row.backfilling else "done",
            "events_done": row.backfilled_events,
            "events_total": row.backfill_events,
        },
        "failure": None
        if row.failure is None
        else {"reason": row.failure, "failed_at": iso(row.failed_at_us)},
    }


def meters(page: Page[MeterRow], limit: int) -> ListResource[MeterShape]:
    return {"items": [meter(r) for r in page.items], "pagination": pagination(page.total, limit)}


def quantities(found: Quantities) -> QuantitiesShape:
    answer: QuantitiesShape = {"quantities": _series(found.periods), "total": found.total}
    if found.groups is not None:
        answer["groups"] = [
            {"dimensions": values, "quantities": _series(periods), "total": total}
            for values, periods, total in found.groups
        ]
        answer["other_groups"] = found.other_groups
    return answer


def _series(periods: list[tuple[datetime, float]]) -> list[QuantityShape]:
    return [{"timestamp": t.isoformat(), "quantity": q} for t, q in periods]


# A shard's part of a meter's quantities (`api.fan_out`, step 3): each partial as [range,
# customer, events, total, low, high, unique values, latest point], low and high null when
# infinite (JSON has no infinity), the point [instant, value] or null. Not part of the public
# API: only shards ask for it (a shard of the version before sends no point).
PartialRow = list[Any]


def partials(found: Gathered) -> dict[str, list[PartialRow]]:
    return {
        "partials": [_row(key, p) for key, p in found.partials.items()],
        "total": [_row(key, p) for key, p in found.total.items()],
    }


def _row(key: tuple[int, str], p: Partial) -> PartialRow:
    finite = [None if abs(v) == float("inf") else v for v in (p.low, p.high)]
    point = None if p.last_us == NEVER_US else [p.last_us, p.last]
    return [*key, p.events, p.total, *finite, sorted(p.values, key=repr), point]


def gathered(body: dict[str, list[PartialRow]]) -> Gathered:
    """`partials`' answer read back (its periods are the asking shard's)."""
    return Gathered([], dict(map(_partial, body["partials"])), dict(map(_partial, body["total"])))


def _partial(row: PartialRow) -> tuple[tuple[int, str], Partial]:
    index, customer, events, total, low, high, values, *point = row
    found = Partial(
        events,
        total,
        float("inf") if low is None else low,
        float("-inf") if high is None else high,
        {tuple(v) if isinstance(v, list) else v for v in values},  # SQL's keys are strings
    )
    if point and point[0] is not None:
        found.add_point(*point[0])
    return (index, customer), found
