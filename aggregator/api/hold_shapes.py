"""Holds (meterline's own): `HoldCreate` in, a hold with its customer meter out."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.api.ledger_shapes import CustomerMeterShape, customer_meter
from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.hold_service import Hold, HoldRow, Status
from aggregator.services.pages import Page
from meters.ledger_rules import HoldCreate

__all__ = ["HoldCreate", "HoldShape", "HoldWithMeterShape", "hold", "holds", "with_meter"]


class HoldShape(TypedDict):
    id: str
    external_id: str
    customer_id: str
    meter_id: str
    units: float
    status: Status  # active, settled (by the usage event), released or expired
    created_at: str
    expires_at: str
    ended_at: str | None  # settled or released at


class HoldWithMeterShape(HoldShape):
    customer_meter: CustomerMeterShape


def hold(row: HoldRow, status: Status) -> HoldShape:
    return {
        "id": row.id,
        "external_id": row.external_id,
        "customer_id": row.customer_id,
        "meter_id": row.meter_id,
        "units": row.units,
        "status": status,
        "created_at": iso(row.created_at_us),
        "expires_at": iso(row.expires_at_us),
        "ended_at": iso(row.ended_at_us),
    }


def with_meter(found: Hold) -> HoldWithMeterShape:
    return {**hold(found.row, found.status), "customer_meter": customer_meter(found.customer_meter)}


def holds(page: Page[tuple[HoldRow, Status]], limit: int) -> ListResource[HoldShape]:
    return {
        "items": [hold(r, s) for r, s in page.items],
        "pagination": pagination(page.total, limit),
    }
