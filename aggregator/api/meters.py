"""`/v1/meters/`: create, get, list, update (rename, labels, filter, aggregation, archive)."""

from __future__ import annotations

from typing import Any

import duckdb
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import params, shapes
from aggregator.api.context import ApiContext
from aggregator.errors import NotFound
from aggregator.store import meters as sql
from ingest.http.requests import json_body
from ingest.http.responses import JSON
from meters.customers import parse_model
from meters.definitions import MeterCreate, MeterUpdate
from meters.errors import FieldError, ValidationFailed
from meters.events import now_us


def _is_archived(request: Request) -> bool | None:
    raw = request.query_params.get("is_archived")
    if raw is None:
        return None
    if raw.lower() not in ("true", "false"):
        raise ValidationFailed(
            [FieldError("bool_parsing", ("query", "is_archived"), "Input should be a boolean", raw)]
        )
    return raw.lower() == "true"


def routes(ctx: ApiContext) -> list[Route]:
    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(MeterCreate, await json_body(request, ctx.max_body_bytes))
        row = await ctx.store.write(sql.create_job(org, data, now_us()))
        return JSON(shapes.meter(row), status_code=201)

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        row = await ctx.store.read(sql.get_meter, org, request.path_params["id"])
        if row is None:
            raise NotFound("Meter not found")
        return JSON(shapes.meter(row))

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(MeterUpdate, await json_body(request, ctx.max_body_bytes))
        meter_id = request.path_params["id"]
        if await ctx.store.read(sql.get_meter, org, meter_id) is None:
            raise NotFound("Meter not found")
        row = await ctx.store.write(sql.update_job(org, meter_id, data, now_us()))
        return JSON(shapes.meter(row))

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        sorting = params.sorting(request, sql.METER_SORTS, "name")
        query = request.query_params.get("query")
        archived = _is_archived(request)
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

    return [
        Route("/v1/meters/", list_, methods=["GET"]),
        Route("/v1/meters/", create, methods=["POST"]),
        Route("/v1/meters/{id}", get, methods=["GET"]),
        Route("/v1/meters/{id}", update, methods=["PATCH"]),
    ]
