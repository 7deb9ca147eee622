"""`/v1/meters/`: create, get, list, update (rename, labels, filter, aggregation, archive)."""

from __future__ import annotations

from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import params, shapes
from aggregator.api.context import ApiContext
from aggregator.api.shapes import failed
from aggregator.errors import NotFound
from aggregator.store import customers as customer_sql
from aggregator.store import meters as sql
from aggregator.store import quantities as quantity_sql
from aggregator.store import subjects
from aggregator.store.quantities import Scope
from ingest.http import JSON
from meters.definitions import MeterCreate, MeterUpdate
from meters.errors import FieldError, ValidationFailed
from meters.periods import MAX_DAYS, Interval
from meters.times import now_us
from meters.wire import parse_model

AGGREGATION_FUNCTIONS = frozenset({"count", "sum", "max", "min", "avg", "unique"})


def _choice(request: Request, name: str, allowed: frozenset[str], required: bool) -> str | None:
    raw = request.query_params.get(name)
    if raw is None and not required:
        return None
    if raw not in allowed:
        raise ValidationFailed(
            [
                FieldError(
                    "missing" if raw is None else "enum",
                    ("query", name),
                    "Field required"
                    if raw is None
                    else "Input should be one of: " + ", ".join(sorted(allowed)),
                    raw,
                )
            ]
        )
    return raw


def _quantity_window(request: Request) -> tuple[int, int, Interval, ZoneInfo]:
    start = params.timestamp(request, "start_timestamp")
    end = params.timestamp(request, "end_timestamp")
    for name, value in (("start_timestamp", start), ("end_timestamp", end)):
        if value is None:
            raise ValidationFailed([FieldError("missing", ("query", name), "Field required", None)])
    assert start is not None and end is not None
    interval = cast(Interval, _choice(request, "interval", frozenset(MAX_DAYS), True))
    name = request.query_params.get("timezone", "UTC")
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed(
            [FieldError("timezone", ("query", "timezone"), "Unknown IANA timezone", name)]
        ) from None
    if start > end or (end - start) > MAX_DAYS[interval] * 86_400_000_000:
        raise ValidationFailed(
            [
                FieldError(
                    "interval",
                    ("query", "interval"),
                    "The interval is too small for the given date range. Use a larger interval"
                    " or reduce the date range.",
                    interval,
                )
            ]
        )
    return start, end, interval, tz


def _subjects(
    con: duckdb.DuckDBPyConnection, org: str, ids: tuple[str, ...], external: tuple[str, ...]
) -> tuple[str, ...] | None:
    """Customer filters as rollup subjects: every id and external id of each customer."""
    if not ids and not external:
        return None
    found = customer_sql.customers_by_refs(con, org, list(ids), list(external))
    names = {subjects.of_id(i) for i in ids} | {subjects.of_external(e) for e in external}
    names |= {s for c in found for s in subjects.of_customer(c)}
    return tuple(sorted(names))


def routes(ctx: ApiContext) -> list[Route]:
    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(MeterCreate, await ctx.json(request))
        row = await ctx.store.write(sql.create_job(org, data, now_us()))
        ctx.backfiller.start(row.id, row.version)
        return JSON(shapes.meter(row), status_code=201)

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        row = await ctx.store.read(sql.get_meter, org, params.path_id(request))
        if row is None:
            raise NotFound("Meter not found")
        return JSON(shapes.meter(row))

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        meter_id = params.path_id(request)
        data = parse_model(MeterUpdate, await ctx.json(request))
        if await ctx.store.read(sql.get_meter, org, meter_id) is None:
            raise NotFound("Meter not found")
        row = await ctx.store.write(sql.update_job(org, meter_id, data, now_us(), ctx.store.live))
        if row.backfilling:
            ctx.backfiller.start(row.id, row.version)
        return JSON(shapes.meter(row))

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        sorting = params.sorting(request, sql.METER_SORTS, "name")
        query = request.query_params.get("query")
        archived = params.boolean(request, "is_archived")
        metadata = [(k, list(v)) for k, v in params.metadata(request)]

        def run(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            rows, total = sql.list_meters(
                con,
                org,
                query=query,
                is_archived=archived,
                metadata=metadata,
                sorting=sorting,
                limit=limit,
                offset=(page - 1) * limit,
            )
            return {
                "items": [shapes.meter(r) for r in rows],
                "pagination": params.pagination(total, limit),
            }

        return JSON(await ctx.store.read(run))

    async def quantities(request: Request) -> JSON:
        org = ctx.organization(request)
        start, end, interval, tz = _quantity_window(request)
        across = _choice(request, "customer_aggregation_function", AGGREGATION_FUNCTIONS, False)
        ids = params.ids(request, "customer_id")
        external = params.strings(request, "external_customer_id")
        metadata = params.metadata(request)
        meter_id = params.path_id(request)

        def run(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            meter = sql.get_meter(con, org, meter_id)
            if meter is None:
                raise NotFound("Meter not found")
            failed(meter)
            scope = Scope(meter, _subjects(con, org, ids, external), metadata, across is not None)
            periods, total = quantity_sql.compute(con, scope, start, end, interval, tz, across)
            return {
                "quantities": [{"timestamp": t.isoformat(), "quantity": q} for t, q in periods],
                "total": total,
            }

        return JSON(await ctx.store.read(run))

    return [
        Route("/v1/meters/{id}/quantities", quantities, methods=["GET"]),
        Route("/v1/meters/", list_, methods=["GET"]),
        Route("/v1/meters/", create, methods=["POST"]),
        Route("/v1/meters/{id}", get, methods=["GET"]),
        Route("/v1/meters/{id}", update, methods=["PATCH"]),
    ]
