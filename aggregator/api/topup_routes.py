"""Top-up rules (meterline's own): a customer meter's available balance falling below a rule's
threshold credits its units as a grant, at most `max_per_period` times per period, each with a
`customer_meter.topped_up` webhook event; and the top-ups they made."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aggregator.api import fan_out, params
from aggregator.api import openapi as oa
from aggregator.api import topup_shapes as shapes
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.api.topup_shapes import (
    TopUpRuleCreate,
    TopUpRuleShape,
    TopUpRuleUpdate,
    TopUpShape,
)
from aggregator.services import topup_service as service
from ingest.http import JSON
from meters.wire import parse_model

TAG = "top-ups"
_CUSTOMER = (
    oa.query("customer_id", oa.ID, "the rules that apply to the customer (its own, and every"
             " customer's of their meter); this or external_customer_id"),
    oa.query("external_customer_id", oa.STRING),
)  # fmt: skip
CREATE = Operation(
    "Create a top-up rule",
    TAG,
    {201: TopUpRuleShape},
    body=TopUpRuleCreate,
    errors=(409,),
    description=(
        "When the customer meter's available balance falls below `threshold` at an event,"
        " `units` are credited as a grant (`priority`, expiring `expires_in_days` after), at"
        " most `max_per_period` times per UTC day, ISO week or month. `units` must be more"
        " than one event consumes (1 for a count meter; the largest quantity the meter has"
        " seen for a sum meter): a 422 names it otherwise."
    ),
)
LIST = Operation(
    "List top-up rules",
    TAG,
    {200: ListResource[TopUpRuleShape]},
    query=(*oa.page_and_limit(), oa.query("meter_id", oa.ID), *_CUSTOMER),
)
TOP_UPS = Operation(
    "List the top-ups made",
    TAG,
    {200: ListResource[TopUpShape]},
    query=(
        *oa.page_and_limit(),
        oa.query("rule_id", oa.ID),
        oa.query("meter_id", oa.ID),
        oa.query("customer_id", oa.ID, "this or external_customer_id"),
        oa.query("external_customer_id", oa.STRING),
    ),
    description="Newest first.",
)


def routes(ctx: ApiContext) -> list[Route]:
    store = ctx.store

    async def customer(request: Request, org: str) -> str | None:
        return await service.customer_of(
            store,
            org,
            params.one_id(request, "customer_id"),
            request.query_params.get("external_customer_id"),
        )

    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(TopUpRuleCreate, await ctx.json(request))
        made = await service.create(
            store, org, data, ctx.limits, request_id=ctx.request_id(request)
        )
        return JSON(shapes.rule(made), status_code=201)

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        meter_id = params.one_id(request, "meter_id")
        customer_id = await customer(request, org)
        found = await service.list_(store, org, meter_id, customer_id, page, limit)
        return JSON(shapes.rules(found, limit))

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.rule(await service.get(store, org, params.path_id(request))))

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        rule_id = params.path_id(request)
        data = parse_model(TopUpRuleUpdate, await ctx.json(request))
        changed = await service.update(
            store, org, rule_id, data, request_id=ctx.request_id(request)
        )
        return JSON(shapes.rule(changed))

    async def delete(request: Request) -> Response:
        org = ctx.organization(request)
        await service.delete(
            store, org, params.path_id(request), request_id=ctx.request_id(request)
        )
        return Response(status_code=204)

    async def top_ups(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        rule_id, meter_id = params.one_id(request, "rule_id"), params.one_id(request, "meter_id")
        customer_id = await customer(request, org)

        async def made(page: int, limit: int) -> ListResource[TopUpShape]:
            found = await service.top_ups(store, org, rule_id, meter_id, customer_id, page, limit)
            return shapes.top_ups(found, limit)

        # A top-up is its customer's shard's (`fan_out`, step 6), newest first.
        peers = ctx.fanned_out(request)
        return JSON(await fan_out.rows(peers, request, made, fan_out.newest_first, page, limit))

    rule = "/v1/top-up-rules/{id}"
    return [
        ApiRoute("/v1/top-up-rules/", create, "POST", CREATE),
        ApiRoute("/v1/top-up-rules/", list_, "GET", LIST),
        ApiRoute(rule, get, "GET", Operation("Get a top-up rule", TAG, {200: TopUpRuleShape})),
        ApiRoute(
            rule,
            update,
            "PATCH",
            Operation("Update a top-up rule", TAG, {200: TopUpRuleShape}, body=TopUpRuleUpdate),
        ),
        ApiRoute(rule, delete, "DELETE", Operation("Delete a top-up rule", TAG, {204: None})),
        ApiRoute("/v1/top-ups/", top_ups, "GET", TOP_UPS),
    ]
