"""The credit ledger's API: customer meters and customer state (Polar's shapes), and
meterline's own credits, resets, credit plans and balance check."""

from __future__ import annotations

from typing import Any

import duckdb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aggregator.api import params, shapes
from aggregator.api.context import ApiContext
from aggregator.api.customers import shaped
from aggregator.errors import NotFound
from aggregator.store import customers as customer_sql
from aggregator.store import ledger as sql
from aggregator.store import plans as plan_sql
from aggregator.store.balances import Balances
from aggregator.store.live import Live
from aggregator.store.meters import get_meter
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed
from meters.ledger import CreditCreate, PlanCreate, ResetCreate
from meters.times import now_us
from meters.wire import parse_model

Con = duckdb.DuckDBPyConnection
SORTS = frozenset({"modified_at", "-modified_at"})
# The largest integer a balance (a double) holds exactly.
MAX_UNITS = 2**53 - 1


def _customer_meters(
    con: Con, balances: Balances, org: str, pairs: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """CustomerMeter shapes (customer and meter nested) for (customer id, meter id) pairs."""
    customers = {
        c.id: c for c in customer_sql.customers_by_refs(con, org, [p[0] for p in pairs], [])
    }
    customer_shapes = dict(zip(customers, shaped(con, org, list(customers.values())), strict=True))
    meters = {m: get_meter(con, org, m) for m in {meter_id for _, meter_id in pairs}}
    out = []
    for customer_id, meter_id in pairs:
        meter = meters[meter_id]
        assert meter is not None
        cm = sql.held_customer_meter(balances, customers[customer_id], meter)
        out.append(
            {
                **_balance(cm),
                "customer_id": customer_id,
                "customer": customer_shapes[customer_id],
                "meter": shapes.meter(meter),
            }
        )
    return out


def _balance(cm: sql.CustomerMeter) -> dict[str, Any]:
    return {
        "id": cm.id,
        "created_at": shapes.iso(cm.created_at_us),
        "modified_at": shapes.iso(cm.modified_at_us),
        "meter_id": cm.meter_id,
        "consumed_units": cm.consumed,
        "credited_units": cm.credited,
        "balance": cm.balance,
    }


def _state(
    con: Con, balances: Balances, org: str, customer: customer_sql.CustomerRow | None
) -> dict[str, Any]:
    """Polar's CustomerState: the customer, its active meters; no subscriptions or benefits
    (meterline has none)."""
    if customer is None:
        raise NotFound("Customer not found")
    pairs, _ = sql.active_pairs(
        con,
        org,
        customer_ids=[customer.id],
        external_ids=None,
        meter_ids=None,
        limit=10_000,
        offset=0,
    )
    meters = []
    for _, meter_id in pairs:
        meter = get_meter(con, org, meter_id)
        assert meter is not None
        meters.append(_balance(sql.held_customer_meter(balances, customer, meter)))
    return {
        **shaped(con, org, [customer])[0],
        "active_subscriptions": [],
        "granted_benefits": [],
        "active_meters": meters,
    }


def _plan(plan: plan_sql.PlanRow) -> dict[str, Any]:
    return {
        "id": plan.id,
        "external_id": plan.external_id,
        "customer_id": plan.customer_id,
        "meter_id": plan.meter_id,
        "units": plan.units,
        "interval": plan.interval,
        "rollover": plan.rollover,
        "starts_at": shapes.iso(plan.starts_at_us),
        "cycles": plan.cycles,
        "next_cycle_at": shapes.iso(plan.next_cycle_at_us),
        "created_at": shapes.iso(plan.created_at_us),
    }


def check_balance(
    con: Con,
    live: Live,
    org: str,
    meter_id: str,
    customer_id: str | None,
    external_customer_id: str | None,
    units: float,
) -> dict[str, Any]:
    """May the customer use `units` more of the meter? From memory (`live`): DuckDB is read
    only for a customer or meter not held yet."""
    catalog = live.catalog
    customer = (
        catalog.customer(con, org, customer_id)
        if customer_id
        else catalog.customer_by_external_id(con, org, external_customer_id or "")
    )
    meter = catalog.meter(con, org, meter_id)
    if customer is None or meter is None:
        raise NotFound("Customer or meter not found")
    cm = sql.held_customer_meter(live.balances, customer, meter)
    return {
        "allowed": cm.balance - units >= 0,
        "units": units,
        "balance": cm.balance,
        "balance_after": cm.balance - units,
        "consumed_units": cm.consumed,
        "credited_units": cm.credited,
    }


def routes(ctx: ApiContext) -> list[Route]:
    store = ctx.store
    balances = store.live.balances

    async def list_customer_meters(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        sorting = params.sorting(request, SORTS, "-modified_at")
        ids = params.ids(request, "customer_id")
        external = params.strings(request, "external_customer_id")
        # Archived meters show only when asked for by id (Polar).
        meter_ids = list(params.ids(request, "meter_id")) or None

        def run(con: Con) -> dict[str, Any]:
            pairs, total = sql.active_pairs(
                con,
                org,
                customer_ids=list(ids) if ids or external else None,
                external_ids=list(external) if ids or external else None,
                meter_ids=meter_ids,
                limit=limit,
                offset=(page - 1) * limit,
                descending=sorting[0] == "-modified_at",
            )
            return {
                "items": _customer_meters(con, balances, org, pairs),
                "pagination": params.pagination(total, limit),
            }

        return JSON(await store.read(run))

    async def get_customer_meter(request: Request) -> JSON:
        org = ctx.organization(request)
        cm_id = params.path_id(request)

        def run(con: Con) -> dict[str, Any]:
            pairs, _ = sql.active_pairs(
                con,
                org,
                customer_ids=None,
                external_ids=None,
                meter_ids=None,
                id=cm_id,
                limit=1,
                offset=0,
            )
            if not pairs:
                raise NotFound("Customer meter not found")
            return _customer_meters(con, balances, org, pairs)[0]

        return JSON(await store.read(run))

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

        return JSON(
            await store.read_now(
                check_balance, store.live, org, meter_id, customer_id, external, units
            )
        )

    async def state(request: Request) -> JSON:
        org = ctx.organization(request)
        key = params.path_id(request)
        return JSON(
            await store.read(
                lambda con: _state(con, balances, org, customer_sql.get_customer(con, org, key))
            )
        )

    async def state_external(request: Request) -> JSON:
        org = ctx.organization(request)
        key = request.path_params["external_id"]
        return JSON(
            await store.read(
                lambda con: _state(
                    con, balances, org, customer_sql.get_customer_by_external_id(con, org, key)
                )
            )
        )

    async def credit(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(CreditCreate, await ctx.json(request))
        applied = await store.write(sql.credit_job(org, data, now_us(), store.live))
        return await _applied(org, applied)

    async def reset(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(ResetCreate, await ctx.json(request))
        applied = await store.write(sql.reset_job(org, data, now_us(), store.live))
        return await _applied(org, applied)

    async def _applied(org: str, applied: sql.Applied) -> JSON:
        cm = applied.customer_meter
        body = await store.read(
            lambda con: _customer_meters(con, balances, org, [(cm.customer_id, cm.meter_id)])[0]
        )
        # The balance as the call left it (a replay answers what the first call did).
        return JSON(
            {"customer_meter": {**body, **_balance(cm)}, "replayed": applied.replayed},
            status_code=200 if applied.replayed else 201,
        )

    async def create_plan(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(PlanCreate, await ctx.json(request))
        plan, created = await store.write(plan_sql.plan_create_job(org, data, now_us(), store.live))
        return JSON(_plan(plan), status_code=201 if created else 200)

    async def list_plans(request: Request) -> JSON:
        org = ctx.organization(request)
        customer_id = params.one_id(request, "customer_id")
        meter_id = params.one_id(request, "meter_id")
        plans = await store.read_now(plan_sql.list_plans, org, customer_id, meter_id)
        return JSON({"items": [_plan(p) for p in plans]})

    async def get_plan(request: Request) -> JSON:
        org = ctx.organization(request)
        plan = await store.read_now(plan_sql.get_plan, org, params.path_id(request))
        if plan is None or plan.deleted_at_us is not None:
            raise NotFound("Credit plan not found")
        return JSON(_plan(plan))

    async def delete_plan(request: Request) -> Response:
        org = ctx.organization(request)
        plan_id = params.path_id(request)
        if not await store.write(plan_sql.plan_delete_job(org, plan_id, now_us())):
            raise NotFound("Credit plan not found")
        return Response(status_code=204)

    return [
        Route("/v1/customer-meters/", list_customer_meters, methods=["GET"]),
        Route("/v1/customer-meters/check", check, methods=["GET"]),
        Route("/v1/customer-meters/{id}", get_customer_meter, methods=["GET"]),
        Route("/v1/customers/{id}/state", state, methods=["GET"]),
        # Before the customers' routes: their `external/{external_id:path}` would take it.
        Route("/v1/customers/external/{external_id:path}/state", state_external, methods=["GET"]),
        Route("/v1/meter-credits/", credit, methods=["POST"]),
        Route("/v1/meter-resets/", reset, methods=["POST"]),
        Route("/v1/credit-plans/", create_plan, methods=["POST"]),
        Route("/v1/credit-plans/", list_plans, methods=["GET"]),
        Route("/v1/credit-plans/{id}", get_plan, methods=["GET"]),
        Route("/v1/credit-plans/{id}", delete_plan, methods=["DELETE"]),
    ]
