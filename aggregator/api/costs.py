"""`/v1/costs/`: what events cost (their `_cost.amount`, cents), in total, per group and period.

A meterline extension (Polar has no such endpoint). Amounts are exact decimal strings in the
canonical form of `_cost.amount` (`aggregator.store.costs.decimal_text`), never floats.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import params
from aggregator.api.context import ApiContext
from aggregator.store import costs as sql
from aggregator.store.costs import GROUP_KEYS, CostQuery, decimal_text
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed
from meters.periods import MAX_DAYS, Interval, boundaries
from meters.times import datetime_to_us, us_to_datetime

MAX_GROUPS = 1000
SORTS = frozenset({"-cost", "cost"})
GROUPS = frozenset(GROUP_KEYS)
_DAY_US = 86_400_000_000


def _fail(name: str, type_: str, msg: str, value: object) -> ValidationFailed:
    return ValidationFailed([FieldError(type_, ("query", name), msg, value)])


def _check_choice(name: str, value: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise _fail(name, "enum", "Input should be one of: " + ", ".join(sorted(allowed)), value)
    return value


def _window(request: Request) -> tuple[int, int, Interval | None, ZoneInfo]:
    """The range, the optional interval and the timezone. The range limits are the
    quantities' per interval; without an interval, the widest of them (years': 3650 days)."""
    start = params.timestamp(request, "start_timestamp")
    end = params.timestamp(request, "end_timestamp")
    for name, value in (("start_timestamp", start), ("end_timestamp", end)):
        if value is None:
            raise _fail(name, "missing", "Field required", None)
    assert start is not None and end is not None
    raw = request.query_params.get("interval")
    interval = (
        None if raw is None else cast(Interval, _check_choice("interval", raw, frozenset(MAX_DAYS)))
    )
    name = request.query_params.get("timezone", "UTC")
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _fail("timezone", "timezone", "Unknown IANA timezone", name) from None
    if start > end:
        raise _fail(
            "end_timestamp",
            "range",
            "end_timestamp should not be before start_timestamp",
            request.query_params["end_timestamp"],
        )
    if interval is not None and end - start > MAX_DAYS[interval] * _DAY_US:
        raise _fail(
            "interval",
            "interval",
            "The interval is too small for the given date range. Use a larger interval"
            " or reduce the date range.",
            interval,
        )
    if end - start > MAX_DAYS["year"] * _DAY_US:
        raise _fail(
            "end_timestamp",
            "range",
            f"The date range should span at most {MAX_DAYS['year']} days",
            request.query_params["end_timestamp"],
        )
    return start, end, interval, tz


def _group_by(request: Request) -> tuple[str, ...]:
    """The requested groupings in a fixed order, each once: the keys, and the order of tied
    groups, do not depend on how the query string lists them."""
    chosen = {_check_choice("group_by", v, GROUPS) for v in params.strings(request, "group_by")}
    return tuple(g for g in GROUP_KEYS if g in chosen)


def _boundaries(start: int, end: int, interval: Interval | None, tz: ZoneInfo) -> list[datetime]:
    if interval is None:
        return []
    return boundaries(us_to_datetime(start), us_to_datetime(end), interval, tz)


def _period(moment: datetime, found: tuple[Decimal, int] | None) -> dict[str, Any]:
    amount, events = found or (Decimal(0), 0)
    return {"timestamp": moment.isoformat(), "amount": decimal_text(amount), "events": events}


def routes(ctx: ApiContext) -> list[Route]:
    async def costs(request: Request) -> JSON:
        org = ctx.organization(request)
        start, end, interval, tz = _window(request)
        group_by = _group_by(request)
        limit = params.integer(request, "limit", 100, 1, MAX_GROUPS)
        sort = _check_choice("sort", request.query_params.get("sort", "-cost"), SORTS)
        ids = params.ids(request, "customer_id")
        external = params.strings(request, "external_customer_id")
        bounds = _boundaries(start, end, interval, tz)
        query = CostQuery(
            org,
            start,
            end,
            group_by,
            edges=tuple(datetime_to_us(b) for b in bounds),
            names=params.strings(request, "name"),
            customers_filtered=bool(ids or external),
            customer_ids=ids,
            external_customer_ids=external,
            limit=limit,
            ascending=sort == "cost",
        )

        def run(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            result = sql.compute(con, query)
            groups = []
            for group in result.groups:
                shaped: dict[str, Any] = {
                    "key": group.key,
                    "amount": decimal_text(group.amount),
                    "events": group.events,
                }
                if interval is not None:
                    # Every period, the empty ones too: a dense series is what charts need.
                    shaped["periods"] = [
                        _period(moment, group.periods.get(i))
                        for i, moment in enumerate(bounds[:-1])
                    ]
                groups.append(shaped)
            return {
                "total": {
                    "amount": decimal_text(result.amount),
                    "currency": "usd",
                    "events": result.events,
                },
                "groups": groups,
            }

        return JSON(await ctx.store.read(run))

    return [Route("/v1/costs/", costs, methods=["GET"])]
