"""`/v1/meters/`: create, get, list, update (rename, labels, filter, aggregation, archive)."""

from __future__ import annotations

from typing import cast

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import fan_out, params
from aggregator.api import meter_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.meter_shapes import MeterCreate, MeterShape, MeterUpdate, QuantitiesShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.api.shard_routing import routed
from aggregator.services import meter_service as service
from aggregator.services.meter_service import QuantityWindow
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed
from meters.periods import MAX_DAYS, Interval
from meters.wire import parse_model

AGGREGATION_FUNCTIONS = frozenset({"count", "sum", "max", "min", "avg", "unique"})


def _choice(request: Request, name: str, allowed: frozenset[str], required: bool) -> str | None:
    raw = request.query_params.get(name)
    if raw is None and not required:
        return None
    if raw not in allowed:
        raise ValidationFailed(
            [
                FieldError(
                    "missing" if raw is None else "enum",
                    ("query", name),
                    "Field required"
                    if raw is None
                    else "Input should be one of: " + ", ".join(sorted(allowed)),
                    raw,
                )
            ]
        )
    return raw


def _quantity_window(request: Request) -> QuantityWindow:
    start = params.timestamp(request, "start_timestamp")
    end = params.timestamp(request, "end_timestamp")
    for name, value in (("start_timestamp", start), ("end_timestamp", end)):
        if value is None:
            raise ValidationFailed([FieldError("missing", ("query", name), "Field required", None)])
    assert start is not None and end is not None
    interval = cast(Interval, _choice(request, "interval", frozenset(MAX_DAYS), True))
    tz = params.timezone(request)
    if start > end or (end - start) > MAX_DAYS[interval] * 86_400_000_000:
        raise ValidationFailed(
            [
                FieldError(
                    "value_error",
                    ("query", "interval"),
                    "The interval is too small for the given date range. Use a larger interval"
                    " or reduce the date range.",
                    interval,
                )
            ]
        )
    return QuantityWindow(start, end, interval, tz)


TAG = "meters"
LIST = Operation(
    "List meters",
    TAG,
    {200: ListResource[MeterShape]},
    query=(
        *oa.page_and_limit(),
        oa.sorting(service.METER_SORTS, "name"),
        oa.query("query", oa.STRING, "text in the name"),
        oa.query("is_archived", oa.BOOLEAN),
        oa.metadata(),
    ),
)
QUANTITIES = Operation(
    "A meter's quantities per period",
    TAG,
    {200: QuantitiesShape},
    query=(
        *oa.window(required=True),
        oa.query("interval", oa.choice(MAX_DAYS), required=True),
        oa.timezone(),
        *oa.customers(),
        oa.metadata(),
        oa.query("customer_aggregation_function", oa.choice(AGGREGATION_FUNCTIONS)),
        oa.repeated(
            "group_by",
            oa.STRING,
            "a dimension of the meter to split by (repeat for several): `groups` answers each"
            " group's quantities and total",
        ),
        oa.metadata(
            "dimension",
            "dimension[name]=value: only the events with that value of the meter's dimension;"
            " repeat for any of values",
        ),
    ),
    errors=(409,),
    description="409 for a meter marked failed (it cannot be evaluated) until it is redefined.",
)


def routes(ctx: ApiContext) -> list[Route]:
    async def create(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(MeterCreate, await ctx.json(request))
        row = await service.create(
            ctx.store, org, data, ctx.limits, request_id=ctx.request_id(request)
        )
        return JSON(shapes.meter(row), status_code=201)

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.meter(await service.get(ctx.store, org, params.path_id(request))))

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        meter_id = params.path_id(request)
        data = parse_model(MeterUpdate, await ctx.json(request))
        row = await service.update(
            ctx.store,
            org,
            meter_id,
            data,
            ctx.limits,
            request_id=ctx.request_id(request),
        )
        return JSON(shapes.meter(row))

    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        found = await service.list_(
            ctx.store,
            org,
            sorting=params.sorting(request, service.METER_SORTS, "name"),
            query=request.query_params.get("query"),
            is_archived=params.boolean(request, "is_archived"),
            metadata=[(k, list(v)) for k, v in params.metadata(request)],
            page=page,
            limit=limit,
        )
        return JSON(shapes.meters(found, limit))

    async def quantities(request: Request) -> JSON:
        org = ctx.organization(request)
        window = _quantity_window(request)
        across = _choice(request, "customer_aggregation_function", AGGREGATION_FUNCTIONS, False)
        group_by = params.group_by(request)
        if group_by and across is not None:
            raise ValidationFailed(
                [
                    FieldError(
                        "value_error",
                        ("query", "group_by"),
                        "Value error, group_by cannot be asked with customer_aggregation_function",
                        list(group_by),
                    )
                ]
            )
        meter, gathered = await service.partials(
            ctx.store,
            org,
            customer_ids=params.ids(request, "customer_id"),
            external_customer_ids=params.strings(request, "external_customer_id"),
            metadata=params.metadata(request),
            meter_id=params.path_id(request),
            window=window,
            by_customer=across is not None,
            group_by=group_by,
            dimensions=params.metadata(request, "dimension"),
        )
        if routed(request) == fan_out.PARTIALS:
            return JSON(shapes.partials(gathered))
        peers = ctx.fanned_out(request)
        if peers is not None:  # merged with the other shards' (`fan_out`, step 3)
            query = fan_out.kept(request)
            for part in await fan_out.each(peers, request, query, fan_out.PARTIALS):
                gathered.merge(shapes.gathered(part))
        return JSON(shapes.quantities(service.quantities(meter, gathered, across, group_by)))

    return [
        ApiRoute("/v1/meters/{id}/quantities", quantities, "GET", QUANTITIES),
        ApiRoute("/v1/meters/", list_, "GET", LIST),
        ApiRoute(
            "/v1/meters/",
            create,
            "POST",
            Operation("Create a meter", TAG, {201: MeterShape}, body=MeterCreate),
        ),
        ApiRoute("/v1/meters/{id}", get, "GET", Operation("Get a meter", TAG, {200: MeterShape})),
        ApiRoute(
            "/v1/meters/{id}",
            update,
            "PATCH",
            Operation(
                "Update a meter: rename, relabel, redefine, archive",
                TAG,
                {200: MeterShape},
                body=MeterUpdate,
            ),
        ),
    ]
