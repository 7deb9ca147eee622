"""What events cost (their `_cost.amount`), in total, per group and per period."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from aggregator.store import GROUP_KEYS, CostQuery, Store, decimal_text
from aggregator.store import cost_queries as sql
from meters.periods import Interval, boundaries
from meters.times import datetime_to_us, us_to_datetime

__all__ = ["GROUP_KEYS", "CostGroup", "CostPeriod", "CostReport", "costs", "decimal_text"]


@dataclass(frozen=True, slots=True)
class CostPeriod:
    start: datetime
    amount: Decimal
    events: int


@dataclass(frozen=True, slots=True)
class CostGroup:
    key: dict[str, str | None]
    amount: Decimal
    events: int
    # Every period of the range, the empty ones too (a dense series is what charts need);
    # None without an interval.
    periods: list[CostPeriod] | None


@dataclass(frozen=True, slots=True)
class CostReport:
    amount: Decimal
    events: int
    groups: list[CostGroup]


def _boundaries(start: int, end: int, interval: Interval | None, tz: ZoneInfo) -> list[datetime]:
    if interval is None:
        return []
    return boundaries(us_to_datetime(start), us_to_datetime(end), interval, tz)


def _period(start: datetime, found: tuple[Decimal, int] | None) -> CostPeriod:
    amount, events = found or (Decimal(0), 0)
    return CostPeriod(start, amount, events)


async def costs(
    store: Store,
    organization_id: str,
    *,
    start_us: int,
    end_us: int,
    interval: Interval | None,
    tz: ZoneInfo,
    group_by: tuple[str, ...],
    names: tuple[str, ...],
    customer_ids: tuple[str, ...],
    external_customer_ids: tuple[str, ...],
    limit: int,
    ascending: bool,
) -> CostReport:
    """The cost of the range [start, end] in total and for the top `limit` groups (by cost),
    each per period of `interval` in `tz` if given; only of the customers named, if any."""
    bounds = _boundaries(start_us, end_us, interval, tz)
    query = CostQuery(
        organization_id,
        start_us,
        end_us,
        group_by,
        edges=tuple(datetime_to_us(b) for b in bounds),
        names=names,
        customers_filtered=bool(customer_ids or external_customer_ids),
        customer_ids=customer_ids,
        external_customer_ids=external_customer_ids,
        limit=limit,
        ascending=ascending,
    )
    result = await store.read(sql.compute, query)
    groups = [
        CostGroup(
            group.key,
            group.amount,
            group.events,
            None
            if interval is None
            else [_period(start, group.periods.get(i)) for i, start in enumerate(bounds[:-1])],
        )
        for group in result.groups
    ]
    return CostReport(result.amount, result.events, groups)
