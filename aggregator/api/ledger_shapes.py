"""The credit ledger: customer meters and a customer's state as polar-sdk's `CustomerMeter`
and `CustomerState` load them, and meterline's own answers to a credit (`CreditCreate`), a
reset (`ResetCreate`), a balance check and a customer meter's grants."""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict

from aggregator.api.customer_shapes import CustomerShape, customer
from aggregator.api.meter_shapes import MeterShape, meter
from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.ledger_service import (
    Applied,
    BalanceCheck,
    Breakdown,
    CustomerMeter,
    CustomerMeterView,
    CustomerState,
    Grants,
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
    "GrantsShape",
    "ResetCreate",
    "applied",
    "balance_check",
    "customer_meter",
    "customer_meters",
    "grants",
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


class BreakdownGroupShape(TypedDict):
    dimensions: dict[str, str | None]  # the group's value of each dimension asked (null: none)
    consumed_units: float


class BreakdownShape(TypedDict):
    """A customer meter's consumed units split by its meter's dimensions (meterline's own)."""

    id: str
    customer_id: str
    meter_id: str
    consumed_units: float
    groups: list[BreakdownGroupShape]


class CustomerStateShape(CustomerShape):
    # Always empty: meterline has no subscriptions or benefits.
    active_subscriptions: list[dict[str, Any]]
    granted_benefits: list[dict[str, Any]]
    active_meters: list[BalanceShape]


class AppliedShape(TypedDict):
    customer_meter: CustomerMeterShape
    replayed: bool


class GrantShape(TypedDict):
    """One grant (meterline's own): what credits granted it, what revocations left of it, what
    remains of it after consumption burned the grants in order, and its expiry."""

    id: str
    created_at: str
    modified_at: str
    priority: int
    expires_at: str | None
    rollover: bool
    granted_units: int
    units: int  # granted less revoked
    remaining_units: float  # 0 once expired
    expired: bool
    expired_units: int | None  # the unused units its expiry took


class GrantsShape(TypedDict):
    """A customer meter's grants in its window, in the order granted. sum(remaining_units) −
    unallocated_units = balance."""

    customer_meter_id: str
    consumed_units: float
    credited_units: int
    balance: float
    # Consumption no grant covers (negative when it is below what expired grants burned).
    unallocated_units: float
    items: list[GrantShape]


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


def breakdown(found: Breakdown) -> BreakdownShape:
    cm = found.view.balance
    return {
        "id": cm.id,
        "customer_id": cm.customer_id,
        "meter_id": cm.meter_id,
        "consumed_units": cm.consumed,
        "groups": breakdown_groups(found.groups),
    }


def breakdown_groups(
    groups: list[tuple[dict[str, str | None], float]],
) -> list[BreakdownGroupShape]:
    return [{"dimensions": values, "consumed_units": units} for values, units in groups]


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


def grants(found: Grants) -> GrantsShape:
    cm = found.customer_meter
    return {
        "customer_meter_id": cm.id,
        "consumed_units": cm.consumed,
        "credited_units": cm.credited,
        "balance": cm.balance,
        "unallocated_units": found.beyond,
        "items": [
            {
                "id": row.id,
                "created_at": iso(row.created_at_us),
                "modified_at": iso(row.modified_at_us),
                "priority": row.grant.priority,
                "expires_at": iso(row.grant.expires_at_us),
                "rollover": row.grant.rollover,
                "granted_units": row.granted,
                "units": row.grant.units,
                "remaining_units": remaining,
                "expired": not row.grant.active,
                "expired_units": row.grant.expired,
            }
            for row, remaining in found.grants
        ],
    }


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
