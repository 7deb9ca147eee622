"""Costs (meterline's own): amounts are exact decimal strings in the canonical form of
`_cost.amount` (`aggregator.store.tables.cost_queries.decimal_text`), never floats."""

from __future__ import annotations

from typing import Literal, NotRequired

from typing_extensions import TypedDict

from aggregator.services.cost_service import CostGroup, CostPeriod, CostReport, decimal_text

__all__ = ["CostsShape", "costs"]


class CostTotalShape(TypedDict):
    amount: str
    currency: Literal["usd"]
    events: int


class CostPeriodShape(TypedDict):
    timestamp: str
    amount: str
    events: int


class CostGroupShape(TypedDict):
    key: dict[str, str | None]
    amount: str
    events: int
    periods: NotRequired[list[CostPeriodShape]]  # with an interval only


class CostsShape(TypedDict):
    total: CostTotalShape
    groups: list[CostGroupShape]


def _period(period: CostPeriod) -> CostPeriodShape:
    return {
        "timestamp": period.start.isoformat(),
        "amount": decimal_text(period.amount),
        "events": period.events,
    }


def _group(group: CostGroup) -> CostGroupShape:
    shaped: CostGroupShape = {
        "key": group.key,
        "amount": decimal_text(group.amount),
        "events": group.events,
    }
    if group.periods is not None:
        shaped["periods"] = [_period(p) for p in group.periods]
    return shaped


def costs(report: CostReport) -> CostsShape:
    return {
        "total": {
            "amount": decimal_text(report.amount),
            "currency": "usd",
            "events": report.events,
        },
        "groups": [_group(g) for g in report.groups],
    }
