"""Threshold alerts (meterline's own): a customer meter crossing a threshold sends a
`meter.alert` webhook event, once per crossing."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aggregator.api import alert_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api import params
from aggregator.api.alert_shapes import AlertCreate, AlertShape
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.services import alert_service as service
from ingest.http import JSON
from meters.wire import parse_model

TAG = "alerts"
CREATE = Operation(
    "Create a threshold alert",
    TAG,
    {201: AlertShape, 200: AlertShape},
    body=AlertCreate,
    errors=(409,),
    description=oa.IDEMPOTENT,
)
LIST = Operation(
    "List alerts",
    TAG,
    {200: ListResource[AlertShape]},
    query=(*oa.page_and_limit(), oa.query("meter_id", oa.ID)),
)


def routes(ctx: ApiContext) -> list[Route]:
    store = ctx.store

    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(AlertCreate, await ctx.json(request))
        found, created = await service.create(
            store, org, data, ctx.limits, request_id=ctx.request_id(request)
        )
        return JSON(shapes.alert(found), status_code=201 if created else 200)

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        meter_id = params.one_id(request, "meter_id")
        return JSON(shapes.alerts(await service.list_(store, org, meter_id, page, limit), limit))

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.alert(await service.get(store, org, params.path_id(request))))

    async def delete(request: Request) -> Response:
        org = ctx.organization(request)
        await service.delete(
            store, org, params.path_id(request), request_id=ctx.request_id(request)
        )
        return Response(status_code=204)

    return [
        ApiRoute("/v1/meter-alerts/", create, "POST", CREATE),
        ApiRoute("/v1/meter-alerts/", list_, "GET", LIST),
        ApiRoute(
            "/v1/meter-alerts/{id}", get, "GET", Operation("Get an alert", TAG, {200: AlertShape})
        ),
        ApiRoute(
            "/v1/meter-alerts/{id}",
            delete,
            "DELETE",
            Operation("Delete an alert", TAG, {204: None}),
        ),
    ]
