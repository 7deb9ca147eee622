"""`/v1/customers/`: create, get (by id or external id), list, update, delete, export (CSV)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from aggregator.api import customer_shapes as shapes
from aggregator.api import fan_out, params
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.customer_shapes import CustomerCreate, CustomerShape, CustomerUpdate
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.services import customer_service as service
from aggregator.services.pages import Page
from ingest.http import JSON
from meters.wire import parse_model

TAG = "customers"
LIST = Operation(
    "List customers",
    TAG,
    {200: ListResource[CustomerShape]},
    query=(
        *oa.page_and_limit(),
        oa.query("active", oa.BOOLEAN, "with a live subscription: none here, so true lists none"),
        oa.sorting(service.CUSTOMER_SORTS, "-created_at"),
        oa.query("email", oa.STRING),
        oa.query("query", oa.STRING, "text in the name, email or external id"),
        oa.metadata(),
    ),
)
CREATE = Operation("Create a customer", TAG, {201: CustomerShape}, body=CustomerCreate)
EXPORT = Operation(
    "Export the customers as CSV", TAG, {200: oa.Text("text/csv")}, description="Polar's columns"
)
GET = Operation("Get a customer", TAG, {200: CustomerShape})
UPDATE = Operation(
    "Update a customer",
    TAG,
    {200: CustomerShape},
    body=CustomerUpdate,
    errors=(409,),
    description="409 `ExternalIdInUse` for an `external_id` that events already name.",
)
DELETE = Operation(
    "Delete a customer",
    TAG,
    {204: None},
    query=(oa.query("anonymize", oa.BOOLEAN, "also drop the email, billing address and name"),),
)


def routes(ctx: ApiContext) -> list[Route]:
    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(CustomerCreate, await ctx.json(request))
        return JSON(
            shapes.customer(
                await service.create(ctx.store, org, data, request_id=ctx.request_id(request))
            ),
            status_code=201,
        )

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.customer(await service.get(ctx.store, org, params.path_id(request))))

    async def get_external(request: Request) -> JSON:
        org = ctx.organization(request)
        external_id = request.path_params["external_id"]
        return JSON(shapes.customer(await service.get_by_external_id(ctx.store, org, external_id)))

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        external_id = request.path_params.get("external_id")
        customer_id = params.path_id(request) if external_id is None else None
        data = parse_model(CustomerUpdate, await ctx.json(request))
        found = await service.update(
            ctx.store,
            org,
            data,
            customer_id=customer_id,
            external_id=external_id,
            request_id=ctx.request_id(request),
        )
        return JSON(shapes.customer(found))

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        if params.boolean(request, "active"):
            # Polar's "active": with a live subscription. There are no subscriptions here.
            return JSON(shapes.customers(Page([], 0), limit))
        found = await service.list_(
            ctx.store,
            org,
            sorting=params.sorting(request, service.CUSTOMER_SORTS, "-created_at"),
            email=request.query_params.get("email"),
            query=request.query_params.get("query"),
            metadata=[(k, list(v)) for k, v in params.metadata(request)],
            page=page,
            limit=limit,
        )
        answer = shapes.customers(found, limit)
        peers = ctx.fanned_out(request)
        if peers is not None:  # `fan_out`, step 4
            await fan_out.first_events(peers, request, list(answer["items"]))
        return JSON(answer)

    async def delete(request: Request) -> Response:
        org = ctx.organization(request)
        external_id = request.path_params.get("external_id")
        customer_id = params.path_id(request) if external_id is None else None
        await service.delete(
            ctx.store,
            org,
            customer_id=customer_id,
            external_id=external_id,
            anonymize=params.boolean(request, "anonymize") or False,
            request_id=ctx.request_id(request),
        )
        return Response(status_code=204)

    async def export(request: Request) -> StreamingResponse:
        org = ctx.organization(request)

        async def lines() -> AsyncIterator[str]:
            yield shapes.csv_lines([shapes.CSV_HEADER])
            async for rows in service.export(ctx.store, org):
                yield shapes.csv_lines(rows)

        return StreamingResponse(
            lines(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="meterline-customers.csv"'},
        )

    external = "/v1/customers/external/{external_id:path}"
    return [
        ApiRoute("/v1/customers/export", export, "GET", EXPORT),
        ApiRoute("/v1/customers/", list_, "GET", LIST),
        ApiRoute("/v1/customers/", create, "POST", CREATE),
        ApiRoute(external, get_external, "GET", GET.by_external_id()),
        ApiRoute(external, update, "PATCH", UPDATE.by_external_id()),
        ApiRoute(external, delete, "DELETE", DELETE.by_external_id()),
        ApiRoute("/v1/customers/{id}", get, "GET", GET),
        ApiRoute("/v1/customers/{id}", update, "PATCH", UPDATE),
        ApiRoute("/v1/customers/{id}", delete, "DELETE", DELETE),
    ]
