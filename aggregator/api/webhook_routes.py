"""Polar's webhook API, so that polar-sdk's `webhooks.*` methods work: endpoints, deliveries,
redelivering an event."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aggregator.api import fan_out, params
from aggregator.api import openapi as oa
from aggregator.api import webhook_shapes as shapes
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.api.webhook_shapes import (
    DeliveryShape,
    EndpointCreate,
    EndpointShape,
    EndpointUpdate,
)
from aggregator.services import webhook_service as service
from ingest.http import JSON
from meters.webhook_rules import EVENT_TYPES
from meters.wire import parse_model

CODE_CLASSES = frozenset({"2xx", "3xx", "4xx", "5xx"})


TAG = "webhooks"
DELIVERIES = Operation(
    "List webhook deliveries",
    TAG,
    {200: ListResource[DeliveryShape]},
    query=(
        *oa.page_and_limit(),
        oa.repeated("endpoint_id", oa.ID),
        oa.repeated("event_type", oa.choice(EVENT_TYPES)),
        oa.query("succeeded", oa.BOOLEAN),
        oa.query("http_code_class", oa.choice(CODE_CLASSES)),
        *oa.window(required=False),
    ),
)


def routes(ctx: ApiContext, allow_private: bool) -> list[Route]:
    store = ctx.store

    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(EndpointCreate, await ctx.json(request))
        created = await service.create(
            store, org, data, allow_private, ctx.limits, request_id=ctx.request_id(request)
        )
        return JSON(shapes.endpoint(created), status_code=201)

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        return JSON(shapes.endpoints(await service.list_(store, org, page, limit), limit))

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.endpoint(await service.get(store, org, params.path_id(request))))

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        endpoint_id = params.path_id(request)
        data = parse_model(EndpointUpdate, await ctx.json(request))
        updated = await service.update(
            store, org, endpoint_id, data, allow_private, request_id=ctx.request_id(request)
        )
        return JSON(shapes.endpoint(updated))

    async def delete(request: Request) -> Response:
        org = ctx.organization(request)
        await service.delete(
            store, org, params.path_id(request), request_id=ctx.request_id(request)
        )
        return Response(status_code=204)

    async def reset_secret(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(
            shapes.endpoint(
                await service.reset_secret(
                    store, org, params.path_id(request), request_id=ctx.request_id(request)
                )
            )
        )

    async def deliveries(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        code_class = params.choices(request, "http_code_class", CODE_CLASSES)

        async def listed(page: int, limit: int) -> ListResource[DeliveryShape]:
            found = await service.deliveries(
                store,
                org,
                endpoint_ids=list(params.ids(request, "endpoint_id")),
                event_types=list(params.choices(request, "event_type", frozenset(EVENT_TYPES))),
                succeeded=params.boolean(request, "succeeded"),
                http_code_class=code_class[0] if code_class else None,
                start_us=params.timestamp(request, "start_timestamp"),
                end_us=params.timestamp(request, "end_timestamp"),
                page=page,
                limit=limit,
            )
            return shapes.deliveries(found, limit)

        # In `webhook_tables.list_deliveries`' order (a webhook event is its customer's shard's:
        # `fan_out`, step 6).
        peers = ctx.fanned_out(request)
        return JSON(await fan_out.rows(peers, request, listed, fan_out.newest_first, page, limit))

    async def redeliver(request: Request) -> Response:
        org = ctx.organization(request)
        await service.redeliver(
            store, org, params.path_id(request), request_id=ctx.request_id(request)
        )
        return Response(status_code=202)

    endpoint = "/v1/webhooks/endpoints/{id}"
    return [
        ApiRoute(
            "/v1/webhooks/endpoints",
            create,
            "POST",
            Operation("Create a webhook endpoint", TAG, {201: EndpointShape}, body=EndpointCreate),
        ),
        ApiRoute(
            "/v1/webhooks/endpoints",
            list_,
            "GET",
            Operation(
                "List webhook endpoints",
                TAG,
                {200: ListResource[EndpointShape]},
                query=oa.page_and_limit(),
            ),
        ),
        ApiRoute(
            endpoint, get, "GET", Operation("Get a webhook endpoint", TAG, {200: EndpointShape})
        ),
        ApiRoute(
            endpoint,
            update,
            "PATCH",
            Operation("Update a webhook endpoint", TAG, {200: EndpointShape}, body=EndpointUpdate),
        ),
        ApiRoute(
            endpoint, delete, "DELETE", Operation("Delete a webhook endpoint", TAG, {204: None})
        ),
        ApiRoute(
            f"{endpoint}/secret",
            reset_secret,
            "PATCH",
            Operation("Reset a webhook endpoint's secret", TAG, {200: EndpointShape}),
        ),
        ApiRoute("/v1/webhooks/deliveries", deliveries, "GET", DELIVERIES),
        ApiRoute(
            "/v1/webhooks/events/{id}/redeliver",
            redeliver,
            "POST",
            Operation("Deliver a webhook event again", TAG, {202: None}),
        ),
    ]
