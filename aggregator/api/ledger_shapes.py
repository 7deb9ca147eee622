"""The credit ledger: customer meters and a customer's state as polar-sdk's `CustomerMeter`
and `CustomerState` load them, and meterline's own answers to a credit (`CreditCreate`), a
reset (`ResetCreate`) and a balance check."""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict

from aggregator.api.customer_shapes import CustomerShape, customer
from aggregator.api.meter_shapes import MeterShape, meter
from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.ledger_service import (
    Applied,
    BalanceCheck,
    CustomerMeter,
    CustomerMeterView,
    CustomerState,
)
from aggregator.services.pages import Page
from meters.ledger_rules import CreditCreate, ResetCreate

__all__ = [
    "AppliedShape",
    "BalanceCheckShape",
    "BalanceShape",
    "CreditCreate",
    "CustomerMeterShape",
    "CustomerStateShape",
    "ResetCreate",
    "applied",
    "balance_check",
    "customer_meter",
    "customer_meters",
    "state",
]


class BalanceShape(TypedDict):
    """A customer meter without its customer and meter (as a state's `active_meters`)."""

    id: str
    created_at: str
    modified_at: str | None
    meter_id: str
    consumed_units: float
    credited_units: int
    balance: float
    held_units: float  # reserved by active holds (meterline's)
    available: float  # balance less held_units: what a new hold may reserve


class CustomerMeterShape(BalanceShape):
    customer_id: str
    customer: CustomerShape
    meter: MeterShape


class CustomerStateShape(CustomerShape):
    # Always empty: meterline has no subscriptions or benefits.
    active_subscriptions: list[dict[str, Any]]
    granted_benefits: list[dict[str, Any]]
    active_meters: list[BalanceShape]


class AppliedShape(TypedDict):
    customer_meter: CustomerMeterShape
    replayed: bool


class BalanceCheckShape(TypedDict):
    allowed: bool
    units: float
    balance: float
    balance_after: float
    consumed_units: float
    credited_units: int
    held_units: float


def balance(cm: CustomerMeter) -> BalanceShape:
    return {
        "id": cm.id,
        "created_at": iso(cm.created_at_us),
        "modified_at": iso(cm.modified_at_us),
        "meter_id": cm.meter_id,
        "consumed_units": cm.consumed,
        "credited_units": cm.credited,
        "balance": cm.balance,
        "held_units": cm.held,
        "available": cm.available,
    }


def customer_meter(view: CustomerMeterView) -> CustomerMeterShape:
    return {
        **balance(view.balance),
        "customer_id": view.balance.customer_id,
        "customer": customer(view.customer),
        "meter": meter(view.meter),
    }


def customer_meters(page: Page[CustomerMeterView], limit: int) -> ListResource[CustomerMeterShape]:
    return {
        "items": [customer_meter(v) for v in page.items],
        "pagination": pagination(page.total, limit),
    }


def state(found: CustomerState) -> CustomerStateShape:
    return {
        **customer(found.customer),
        "active_subscriptions": [],
        "granted_benefits": [],
        "active_meters": [balance(cm) for cm in found.meters],
    }


def applied(done: Applied) -> AppliedShape:
    return {"customer_meter": customer_meter(done.customer_meter), "replayed": done.replayed}


def balance_check(check: BalanceCheck) -> BalanceCheckShape:
    cm = check.balance
    return {
        "allowed": check.allowed,
        "units": check.units,
        "balance": cm.balance,
        "balance_after": check.balance_after,
        "consumed_units": cm.consumed,
        "credited_units": cm.credited,
        "held_units": cm.held,
    }
