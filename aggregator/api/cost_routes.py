"""`/v1/costs/`: what events cost (their `_cost.amount`, cents), in total, per group and period.

A meterline extension (Polar has no such endpoint); its shapes are `shapes.costs`.
"""

from __future__ import annotations

from typing import cast
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import cost_shapes as shapes
from aggregator.api import fan_out, params
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.cost_shapes import CostsShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.services import cost_service as service
from aggregator.services.cost_service import GROUP_KEYS
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed
from meters.periods import MAX_DAYS, Interval

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
    tz = params.timezone(request)
    if start > end:
        raise _fail(
            "end_timestamp",
            "value_error",
            "end_timestamp should not be before start_timestamp",
            request.query_params["end_timestamp"],
        )
    if interval is not None and end - start > MAX_DAYS[interval] * _DAY_US:
        raise _fail(
            "interval",
            "value_error",
            "The interval is too small for the given date range. Use a larger interval"
            " or reduce the date range.",
            interval,
        )
    if end - start > MAX_DAYS["year"] * _DAY_US:
        raise _fail(
            "end_timestamp",
            "value_error",
            f"The date range should span at most {MAX_DAYS['year']} days",
            request.query_params["end_timestamp"],
        )
    return start, end, interval, tz


def _group_by(request: Request) -> tuple[str, ...]:
    """The requested groupings in a fixed order, each once: the keys, and the order of tied
    groups, do not depend on how the query string lists them."""
    chosen = {_check_choice("group_by", v, GROUPS) for v in params.strings(request, "group_by")}
    return tuple(g for g in GROUP_KEYS if g in chosen)


COSTS = Operation(
    "What events cost, in total, per group and period",
    "costs",
    {200: CostsShape},
    query=(
        *oa.window(required=True),
        oa.query("interval", oa.choice(MAX_DAYS), "a series per group"),
        oa.timezone(),
        oa.repeated("group_by", oa.choice(GROUP_KEYS)),
        *oa.customers(),
        oa.repeated("name", oa.STRING),
        oa.query("limit", oa.integer(1, MAX_GROUPS, 100), "groups"),
        oa.query("sort", oa.choice(SORTS, "-cost")),
    ),
    description="The `_cost.amount` (cents) of every event that has one, exactly.",
)


def routes(ctx: ApiContext) -> list[Route]:
    async def costs(request: Request) -> JSON:
        org = ctx.organization(request)
        start, end, interval, tz = _window(request)
        group_by = _group_by(request)
        limit = params.integer(request, "limit", 100, 1, MAX_GROUPS)
        sort = _check_choice("sort", request.query_params.get("sort", "-cost"), SORTS)
        peers = ctx.fanned_out(request)
        # Of several shards, each gives enough groups that the top `limit` are among them.
        parts = limit if peers is None or "customer" in group_by else MAX_GROUPS
        report = await service.costs(
            ctx.store,
            org,
            start_us=start,
            end_us=end,
            interval=interval,
            tz=tz,
            group_by=group_by,
            customer_ids=params.ids(request, "customer_id"),
            external_customer_ids=params.strings(request, "external_customer_id"),
            names=params.strings(request, "name"),
            limit=parts,
            ascending=sort == "cost",
        )
        answer = shapes.costs(report)
        if peers is None:
            return JSON(answer)
        query = [*fan_out.kept(request), ("limit", str(parts))]
        theirs = await fan_out.each(peers, request, query)
        return JSON(fan_out.costs(answer, theirs, limit, sort == "cost"))

    return [ApiRoute("/v1/costs/", costs, "GET", COSTS)]
