"""Credit plans (meterline's own), created from `PlanCreate`."""

from __future__ import annotations

from typing import Literal

from typing_extensions import TypedDict

from aggregator.api.shapes import iso
from aggregator.services.plan_service import PlanRow
from meters.ledger_rules import PlanCreate

__all__ = ["PlanCreate", "PlanListShape", "PlanShape", "plan", "plans"]


class PlanShape(TypedDict):
    id: str
    external_id: str
    customer_id: str
    meter_id: str
    units: int
    interval: Literal["month", "year"]
    rollover: bool
    starts_at: str
    cycles: int
    next_cycle_at: str
    created_at: str


class PlanListShape(TypedDict):
    items: list[PlanShape]


def plan(row: PlanRow) -> PlanShape:
    return {
        "id": row.id,
        "external_id": row.external_id,
        "customer_id": row.customer_id,
        "meter_id": row.meter_id,
        "units": row.units,
        "interval": row.interval,
        "rollover": row.rollover,
        "starts_at": iso(row.starts_at_us),
        "cycles": row.cycles,
        "next_cycle_at": iso(row.next_cycle_at_us),
        "created_at": iso(row.created_at_us),
    }


def plans(rows: list[PlanRow]) -> PlanListShape:
    return {"items": [plan(p) for p in rows]}
