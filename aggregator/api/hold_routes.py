"""Holds (meterline's own): reserve units of a customer meter's balance before spending them,
so that concurrent requests cannot together overdraw it. The usage event with the hold's
`external_id` settles it; `DELETE` releases it; it expires on its own."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import fan_out, params
from aggregator.api import hold_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.hold_shapes import HoldCreate, HoldShape, HoldWithMeterShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.services import hold_service as service
from ingest.http import JSON
from meters.wire import parse_model

TAG = "holds"
CREATE = Operation(
    "Hold units of a balance",
    TAG,
    {201: HoldWithMeterShape, 200: HoldWithMeterShape},
    body=HoldCreate,
    errors=(409,),
    description=(
        "409 also when the balance less active holds is below `units`, and `LimitReached`"
        " when the organization holds `--max-active-holds-per-organization` active holds."
        f" {oa.IDEMPOTENT}"
    ),
)
LIST = Operation(
    "List holds",
    TAG,
    {200: ListResource[HoldShape]},
    query=(
        *oa.page_and_limit(),
        oa.query("customer_id", oa.ID),
        oa.query("meter_id", oa.ID),
        oa.query("active", oa.BOOLEAN),
    ),
)


def routes(ctx: ApiContext) -> list[Route]:
    store = ctx.store

    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(HoldCreate, await ctx.json(request))
        found, created = await service.create(
            store, org, data, ctx.limits, request_id=ctx.request_id(request)
        )
        return JSON(shapes.with_meter(found), status_code=201 if created else 200)

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)

        async def holds(page: int, limit: int) -> ListResource[HoldShape]:
            found = await service.list_(
                store,
                org,
                customer_id=params.one_id(request, "customer_id"),
                meter_id=params.one_id(request, "meter_id"),
                active=params.boolean(request, "active"),
                page=page,
                limit=limit,
            )
            return shapes.holds(found, limit)

        # In `hold_tables.list_holds`' order (`fan_out`, step 6).
        peers = ctx.fanned_out(request)
        return JSON(await fan_out.rows(peers, request, holds, fan_out.newest_first, page, limit))

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.with_meter(await service.get(store, org, params.path_id(request))))

    async def release(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(
            shapes.with_meter(
                await service.release(
                    store, org, params.path_id(request), request_id=ctx.request_id(request)
                )
            )
        )

    return [
        ApiRoute("/v1/meter-holds/", create, "POST", CREATE),
        ApiRoute("/v1/meter-holds/", list_, "GET", LIST),
        ApiRoute(
            "/v1/meter-holds/{id}",
            get,
            "GET",
            Operation("Get a hold", TAG, {200: HoldWithMeterShape}),
        ),
        ApiRoute(
            "/v1/meter-holds/{id}",
            release,
            "DELETE",
            Operation("Release a hold", TAG, {200: HoldWithMeterShape}),
        ),
    ]
