"""Top-up rules (meterline's own): `TopUpRuleCreate` and `TopUpRuleUpdate` in, the rule out;
and the top-ups the rules made."""

from __future__ import annotations

from typing import cast

from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.pages import Page
from aggregator.services.topup_service import TopUpRow, TopUpRuleRow, top_up_data
from meters.topup_rules import Period, TopUpRuleCreate, TopUpRuleUpdate

__all__ = [
    "TopUpRuleCreate",
    "TopUpRuleShape",
    "TopUpRuleUpdate",
    "TopUpShape",
    "rule",
    "rules",
    "top_up",
    "top_ups",
]


class TopUpRuleShape(TypedDict):
    id: str
    meter_id: str
    customer_id: str | None  # None: every customer of the meter
    threshold: float
    units: int
    max_per_period: int
    period: Period
    priority: int
    expires_in_days: int | None  # None: the grants never expire
    # Why the last top-up due was refused (an event that consumed at least `units`, or no room
    # for another grant), and when; None if none was.
    refused_reason: str | None
    refused_at: str | None
    created_at: str
    modified_at: str


class TopUpShape(TypedDict):
    id: str
    rule_id: str
    customer_id: str
    meter_id: str
    units: int
    period: str  # the period's key: 2026-11-28, 2026-W48 (ISO week), 2026-11 (UTC)
    number: int  # the n-th top-up of the rule for the customer meter in the period
    grant_id: str  # the credit grant it made, or the active one it added to
    balance_before: float  # the available balance after its event, before the top-up
    created_at: str  # its event's ingested_at


def rule(row: TopUpRuleRow) -> TopUpRuleShape:
    return {
        "id": row.id,
        "meter_id": row.meter_id,
        "customer_id": row.customer_id,
        "threshold": row.threshold,
        "units": row.units,
        "max_per_period": row.max_per_period,
        "period": row.period,
        "priority": row.priority,
        "expires_in_days": row.expires_in_days,
        "refused_reason": row.refused_reason,
        "refused_at": iso(row.refused_at_us),
        "created_at": iso(row.created_at_us),
        "modified_at": iso(row.modified_at_us),
    }


def rules(page: Page[TopUpRuleRow], limit: int) -> ListResource[TopUpRuleShape]:
    return {"items": [rule(r) for r in page.items], "pagination": pagination(page.total, limit)}


def top_up(row: TopUpRow) -> TopUpShape:
    """As the `customer_meter.topped_up` webhook's `data.top_up` spells it (the store's)."""
    return cast(TopUpShape, top_up_data(row))


def top_ups(page: Page[TopUpRow], limit: int) -> ListResource[TopUpShape]:
    return {"items": [top_up(r) for r in page.items], "pagination": pagination(page.total, limit)}
