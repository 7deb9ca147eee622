"""The credit ledger's API: customer meters and customer state (Polar's shapes), and
meterline's own credits, resets, credit plans, balance check and a customer meter's grants."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aggregator.api import fan_out, params, plan_shapes
from aggregator.api import ledger_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.ledger_shapes import (
    AppliedShape,
    BalanceCheckShape,
    BreakdownShape,
    CreditCreate,
    CustomerMeterShape,
    CustomerStateShape,
    GrantsShape,
    ResetCreate,
)
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.plan_shapes import PlanCreate, PlanListShape, PlanShape
from aggregator.api.shapes import ListResource
from aggregator.services import ledger_service as service
from aggregator.services import plan_service as plan_service
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import MAX_UNITS
from meters.wire import parse_model

SORTS = frozenset({"modified_at", "-modified_at"})
TAG = "customer-meters"
CREDITS = "credits"
LIST = Operation(
    "List customer meters",
    TAG,
    {200: ListResource[CustomerMeterShape]},
    query=(
        *oa.page_and_limit(),
        oa.sorting(SORTS, "-modified_at"),
        *oa.customers(),
        oa.repeated("meter_id", oa.ID),
    ),
)
CHECK = Operation(
    "Check a balance: may the customer spend these units?",
    TAG,
    {200: BalanceCheckShape},
    query=(
        oa.query("meter_id", oa.ID, required=True),
        oa.query("customer_id", oa.ID, "this or external_customer_id"),
        oa.query("external_customer_id", oa.STRING),
        oa.query("units", oa.integer(0, MAX_UNITS, 1)),
    ),
    errors=(404,),
)
GRANTS = Operation(
    "List a customer meter's credit grants (meterline's own)",
    TAG,
    {200: GrantsShape},
    description=(
        "The grants of the customer meter's window, in the order granted, with what remains of"
        " each after consumption burned them in order (priority, then earliest expiry, then"
        " without rollover before with it, then the order granted); expired grants show what"
        " their expiry took."
    ),
)
BREAKDOWN = Operation(
    "A customer meter's consumed units by dimension (meterline's own)",
    TAG,
    {200: BreakdownShape},
    query=(
        oa.repeated(
            "group_by",
            oa.STRING,
            "a dimension of the meter to split by (repeat for several)",
            required=True,
        ),
    ),
    description=(
        "The customer meter's consumed units (its window: the events applied since its last"
        " reset) split by the events' values of the meter's dimensions asked; the groups"
        " together make its consumed_units."
    ),
)
STATE = Operation("Get a customer's state (active meters)", "customers", {200: CustomerStateShape})


def _applied(summary: str, body: type[CreditCreate | ResetCreate]) -> Operation:
    responses = {201: AppliedShape, 200: AppliedShape}
    return Operation(
        summary, CREDITS, responses, body=body, errors=(409,), description=oa.IDEMPOTENT
    )


def routes(ctx: ApiContext) -> list[Route]:
    store = ctx.store

    async def list_customer_meters(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        sorting = params.sorting(request, SORTS, "-modified_at")
        descending = sorting[0] == "-modified_at"

        async def listed(page: int, limit: int) -> ListResource[CustomerMeterShape]:
            found = await service.list_customer_meters(
                store,
                org,
                customer_ids=params.ids(request, "customer_id"),
                external_customer_ids=params.strings(request, "external_customer_id"),
                # Archived meters show only when asked for by id (Polar).
                meter_ids=list(params.ids(request, "meter_id")) or None,
                descending=descending,
                page=page,
                limit=limit,
            )
            return shapes.customer_meters(found, limit)

        def order(item: Any) -> tuple[Any, ...]:
            """As `ledger_reads.active_pairs` orders them: by last change (never changed
            last), then customer and meter (`fan_out`, step 6)."""
            at = item["modified_at"]
            changed = 0 if at is None else fan_out.micros(at)
            return (
                at is None,
                -changed if descending else changed,
                item["customer_id"],
                item["meter_id"],
            )

        peers = ctx.fanned_out(request)
        return JSON(await fan_out.rows(peers, request, listed, order, page, limit))

    async def get_customer_meter(request: Request) -> JSON:
        org = ctx.organization(request)
        found = await service.get_customer_meter(store, org, params.path_id(request))
        return JSON(shapes.customer_meter(found))

    async def breakdown(request: Request) -> JSON:
        org = ctx.organization(request)
        group_by = params.group_by(request)
        found = await service.breakdown(store, org, params.path_id(request), group_by)
        return JSON(shapes.breakdown(found))

    async def grants(request: Request) -> JSON:
        org = ctx.organization(request)
        found = await service.grants(store, org, params.path_id(request))
        return JSON(shapes.grants(found))

    async def check(request: Request) -> JSON:
        org = ctx.organization(request)
        meter_id = params.one_id(request, "meter_id")
        customer_id = params.one_id(request, "customer_id")
        external = request.query_params.get("external_customer_id")
        units = float(params.integer(request, "units", 1, 0, MAX_UNITS))
        if meter_id is None or (customer_id is None) == (external is None):
            raise ValidationFailed(
                [
                    FieldError(
                        "missing",
                        ("query", "meter_id" if meter_id is None else "customer_id"),
                        "meter_id and exactly one of customer_id / external_customer_id"
                        " are required",
                        None,
                    )
                ]
            )
        found = await service.check(store, org, meter_id, customer_id, external, units)
        return JSON(shapes.balance_check(found))

    async def state(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.state(await service.state(store, org, params.path_id(request))))

    async def state_external(request: Request) -> JSON:
        org = ctx.organization(request)
        external_id = request.path_params["external_id"]
        return JSON(shapes.state(await service.state_by_external_id(store, org, external_id)))

    def applied(done: service.Applied) -> JSON:
        return JSON(shapes.applied(done), status_code=200 if done.replayed else 201)

    async def credit(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(CreditCreate, await ctx.json(request))
        return applied(await service.credit(store, org, data, request_id=ctx.request_id(request)))

    async def reset(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(ResetCreate, await ctx.json(request))
        return applied(await service.reset(store, org, data, request_id=ctx.request_id(request)))

    async def create_plan(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(PlanCreate, await ctx.json(request))
        plan, created = await plan_service.create(
            store, org, data, request_id=ctx.request_id(request)
        )
        return JSON(plan_shapes.plan(plan), status_code=201 if created else 200)

    async def list_plans(request: Request) -> JSON:
        org = ctx.organization(request)
        customer_id = params.one_id(request, "customer_id")
        meter_id = params.one_id(request, "meter_id")
        return JSON(plan_shapes.plans(await plan_service.list_(store, org, customer_id, meter_id)))

    async def get_plan(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(plan_shapes.plan(await plan_service.get(store, org, params.path_id(request))))

    async def delete_plan(request: Request) -> Response:
        org = ctx.organization(request)
        await plan_service.delete(
            store, org, params.path_id(request), request_id=ctx.request_id(request)
        )
        return Response(status_code=204)

    return [
        ApiRoute("/v1/customer-meters/", list_customer_meters, "GET", LIST),
        ApiRoute("/v1/customer-meters/check", check, "GET", CHECK),
        ApiRoute(
            "/v1/customer-meters/{id}",
            get_customer_meter,
            "GET",
            Operation("Get a customer meter", TAG, {200: CustomerMeterShape}),
        ),
        ApiRoute("/v1/customer-meters/{id}/grants", grants, "GET", GRANTS),
        ApiRoute("/v1/customer-meters/{id}/breakdown", breakdown, "GET", BREAKDOWN),
        ApiRoute("/v1/customers/{id}/state", state, "GET", STATE),
        # Before the customers' routes: their `external/{external_id:path}` would take it.
        ApiRoute(
            "/v1/customers/external/{external_id:path}/state",
            state_external,
            "GET",
            STATE.by_external_id(),
        ),
        ApiRoute("/v1/meter-credits/", credit, "POST", _applied("Credit units", CreditCreate)),
        ApiRoute(
            "/v1/meter-resets/", reset, "POST", _applied("Reset a balance to zero", ResetCreate)
        ),
        ApiRoute(
            "/v1/credit-plans/",
            create_plan,
            "POST",
            Operation(
                "Create a credit plan (units every period)",
                CREDITS,
                {201: PlanShape, 200: PlanShape},
                body=PlanCreate,
                errors=(409,),
                description=oa.IDEMPOTENT,
            ),
        ),
        ApiRoute(
            "/v1/credit-plans/",
            list_plans,
            "GET",
            Operation(
                "List credit plans",
                CREDITS,
                {200: PlanListShape},
                query=(oa.query("customer_id", oa.ID), oa.query("meter_id", oa.ID)),
            ),
        ),
        ApiRoute(
            "/v1/credit-plans/{id}",
            get_plan,
            "GET",
            Operation("Get a credit plan", CREDITS, {200: PlanShape}),
        ),
        ApiRoute(
            "/v1/credit-plans/{id}",
            delete_plan,
            "DELETE",
            Operation("Delete a credit plan", CREDITS, {204: None}),
        ),
    ]
