"""`/v1/customers/`: create, get (by id or external id), list, update."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import duckdb
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import params, shapes
from aggregator.api.context import ApiContext
from aggregator.errors import NotFound
from aggregator.store import customers as sql
from aggregator.store import subjects
from aggregator.store.events import subjects_first_timestamp
from ingest.http import JSON
from meters.customers import CustomerCreate, CustomerUpdate
from meters.times import now_us
from meters.wire import parse_model


def shaped(
    con: duckdb.DuckDBPyConnection, organization_id: str, rows: list[sql.CustomerRow]
) -> list[dict[str, Any]]:
    """Customers in output shape, with `first_user_event_at` from both of their ids."""
    first = subjects_first_timestamp(
        con, organization_id, [s for r in rows for s in subjects.of_customer(r)]
    )
    out = []
    for r in rows:
        times = [t for t in map(first.get, subjects.of_customer(r)) if t]
        out.append(shapes.customer(r, min(times) if times else None))
    return out


def _one(con: duckdb.DuckDBPyConnection, org: str, row: sql.CustomerRow | None) -> dict[str, Any]:
    if row is None:
        raise NotFound("Customer not found")
    return shaped(con, org, [row])[0]


def routes(ctx: ApiContext) -> list[Route]:
    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(CustomerCreate, await ctx.json(request))
        row = await ctx.store.write(sql.create_job(org, data, now_us()))
        return JSON(await ctx.store.read(_one, org, row), status_code=201)

    def getter(
        find: Callable[[duckdb.DuckDBPyConnection, str, str], sql.CustomerRow | None],
        key_of: Callable[[Request], str],
    ) -> Callable[[Request], Awaitable[JSON]]:
        async def get(request: Request) -> JSON:
            org = ctx.organization(request)
            key = key_of(request)
            return JSON(await ctx.store.read(lambda con: _one(con, org, find(con, org, key))))

        return get

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        external_id = request.path_params.get("external_id")
        customer_id = params.path_id(request) if external_id is None else None
        data = parse_model(CustomerUpdate, await ctx.json(request))
        if customer_id is None:
            found = await ctx.store.read(sql.get_customer_by_external_id, org, external_id)
        else:
            found = await ctx.store.read(sql.get_customer, org, customer_id)
        if found is None:
            raise NotFound("Customer not found")
        row = await ctx.store.write(sql.update_job(org, found.id, data, now_us()))
        return JSON(await ctx.store.read(_one, org, row))

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        sorting = params.sorting(request, sql.CUSTOMER_SORTS, "-created_at")
        email = request.query_params.get("email")
        query = request.query_params.get("query")
        metadata = [(k, list(v)) for k, v in params.metadata(request)]

        def run(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            rows, total = sql.list_customers(
                con,
                org,
                email=email,
                query=query,
                metadata=metadata,
                sorting=sorting,
                limit=limit,
                offset=(page - 1) * limit,
            )
            return {"items": shaped(con, org, rows), "pagination": params.pagination(total, limit)}

        return JSON(await ctx.store.read(run))

    return [
        Route("/v1/customers/", list_, methods=["GET"]),
        Route("/v1/customers/", create, methods=["POST"]),
        Route(
            "/v1/customers/external/{external_id:path}",
            getter(sql.get_customer_by_external_id, lambda r: r.path_params["external_id"]),
            methods=["GET"],
        ),
        Route("/v1/customers/external/{external_id:path}", update, methods=["PATCH"]),
        Route("/v1/customers/{id}", getter(sql.get_customer, params.path_id), methods=["GET"]),
        Route("/v1/customers/{id}", update, methods=["PATCH"]),
    ]
