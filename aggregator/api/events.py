"""`GET /v1/events/` and `GET /v1/events/{id}`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import duckdb
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import params, shapes
from aggregator.api.context import ApiContext
from aggregator.api.customers import shaped
from aggregator.api.shapes import failed
from aggregator.errors import NotFound
from aggregator.store import customers as customer_sql
from aggregator.store import events as sql
from aggregator.store import meters as meter_sql
from aggregator.store.meter_sql import meter_events_sql
from ingest.http import JSON

SORTS = frozenset({"timestamp", "-timestamp"})


def _resolve_customers(
    con: duckdb.DuckDBPyConnection, org: str, ids: tuple[str, ...], external: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A customer's events may carry its id or its external id: filter on both."""
    if not ids and not external:
        return (), ()
    found = customer_sql.customers_by_refs(con, org, list(ids), list(external))
    all_ids = set(ids) | {c.id for c in found}
    all_external = set(external) | {c.external_id for c in found if c.external_id}
    return tuple(sorted(all_ids)), tuple(sorted(all_external))


def _shaped_events(
    con: duckdb.DuckDBPyConnection, org: str, rows: list[sql.EventRow]
) -> list[dict[str, Any]]:
    owners = customer_sql.customers_by_refs(
        con,
        org,
        sorted({r.customer_id for r in rows if r.customer_id}),
        sorted({r.external_customer_id for r in rows if r.external_customer_id}),
    )
    shaped_owners = dict(zip([o.id for o in owners], shaped(con, org, owners), strict=True))
    by_external = {o.external_id: shaped_owners[o.id] for o in owners if o.external_id}
    return [
        shapes.event(
            r,
            org,
            shaped_owners.get(r.customer_id or "") or by_external.get(r.external_customer_id or ""),
        )
        for r in rows
    ]


def routes(ctx: ApiContext) -> list[Route]:
    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        order = params.sorting(request, SORTS, "-timestamp")[0]
        customer_ids = params.ids(request, "customer_id")
        external_ids = params.strings(request, "external_customer_id")
        base = sql.EventQuery(
            names=params.strings(request, "name"),
            start_us=params.timestamp(request, "start_timestamp"),
            end_us=params.timestamp(request, "end_timestamp"),
            metadata=params.metadata(request),
            parent_id=request.query_params.get("parent_id"),
            descending=order.startswith("-"),
        )

        meter_id = params.one_id(request, "meter_id")

        def run(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            query = base
            if meter_id is not None:
                meter = meter_sql.get_meter(con, org, meter_id)
                if meter is None:
                    raise NotFound("Meter not found")
                failed(meter)
                query = replace(query, meter=meter_events_sql(meter.filter, meter.aggregation))
            if customer_ids or external_ids:
                ids, external = _resolve_customers(con, org, customer_ids, external_ids)
                if not ids and not external:
                    return {"items": [], "pagination": params.pagination(0, limit)}
                query = replace(query, customer_ids=ids, external_customer_ids=external)
            rows, total = sql.list_events(con, org, query, limit=limit, offset=(page - 1) * limit)
            return {
                "items": _shaped_events(con, org, rows),
                "pagination": params.pagination(total, limit),
            }

        return JSON(await ctx.store.read(run))

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        event_id = params.path_id(request)

        def run(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            row = sql.get_event(con, org, event_id)
            if row is None:
                raise NotFound("Event not found")
            return _shaped_events(con, org, [row])[0]

        return JSON(await ctx.store.read(run))

    return [
        Route("/v1/events/", list_, methods=["GET"]),
        Route("/v1/events/{id}", get, methods=["GET"]),
    ]
