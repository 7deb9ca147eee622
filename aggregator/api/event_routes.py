"""`GET /v1/events/` and `GET /v1/events/{id}`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import event_shapes as shapes
from aggregator.api import fan_out, params
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.event_shapes import EventShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.params import MAX_LIMIT
from aggregator.api.shapes import ListResource, pagination
from aggregator.api.shard_routing import routed
from aggregator.services import event_service as service
from aggregator.services.event_service import Event, EventQuery, Selection
from aggregator.services.pages import Page
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed

SORTS = frozenset({"timestamp", "-timestamp"})
SOURCES = frozenset({"user", "system"})
# Polar's shortest `query`.
MIN_QUERY = 3
# Polar's bound on `depth`.
MAX_DEPTH = 5


def _polar_version(request: Request) -> bool:
    """Whether the client names a Polar API version (polar-sdk does): no version has the
    corrections' system events, so such a client never gets one (it could not load it)."""
    return "polar-version" in request.headers


def _search_text(request: Request) -> str | None:
    text = request.query_params.get("query")
    if text is not None and len(text) < MIN_QUERY:
        raise ValidationFailed(
            [FieldError("query", ("query", "query"), "Query must be at least 3 characters.", text)]
        )
    return text


TAG = "events"
LIST = Operation(
    "List events",
    TAG,
    {200: ListResource[EventShape]},
    query=(
        *oa.page_and_limit(),
        oa.sorting(SORTS, "-timestamp"),
        *oa.customers(),
        oa.repeated("name", oa.STRING),
        *oa.window(required=False),
        oa.metadata(),
        oa.query("filter", oa.STRING, "a JSON-encoded meter filter (`Filter`)"),
        oa.query("meter_id", oa.ID, "the events the meter takes"),
        oa.query("parent_id", oa.STRING, "with depth: its descendants; else its children"),
        oa.query("depth", oa.integer(0, MAX_DEPTH), "roots and descendants to this depth"),
        oa.repeated("source", oa.choice(SOURCES)),
        oa.query(
            "query",
            {"type": "string", "minLength": MIN_QUERY},
            "text in the name, source or metadata, or of the customer",
        ),
        oa.query("voided", oa.BOOLEAN, "voided events too (hidden by default)"),
    ),
    errors=(404, 409),
    description="404 for an unknown meter_id; 409 for a meter marked failed.",
)


def routes(ctx: ApiContext) -> list[Route]:
    async def list_(request: Request) -> JSON:
        org = ctx.organization(request)
        page, limit = params.page_and_limit(request)
        order = params.sorting(request, SORTS, "-timestamp")[0]
        customer_ids = params.ids(request, "customer_id")
        external_ids = params.strings(request, "external_customer_id")
        query = EventQuery(
            names=params.strings(request, "name"),
            start_us=params.timestamp(request, "start_timestamp"),
            end_us=params.timestamp(request, "end_timestamp"),
            metadata=params.metadata(request),
            parent_id=request.query_params.get("parent_id"),
            depth=params.optional_integer(request, "depth", 0, MAX_DEPTH),
            sources=params.choices(request, "source", SOURCES),
            descending=order.startswith("-"),
            voided=params.boolean(request, "voided") or False,
            polar_version=_polar_version(request),
        )
        selection = Selection(
            query,
            meter_id=params.one_id(request, "meter_id"),
            matching=params.meter_filter(request, "filter"),
            text=_search_text(request),
            customer_ids=customer_ids,
            external_customer_ids=external_ids,
        )

        async def events(start: int, count: int) -> Page[Event]:
            return await service.list_(ctx.store, org, selection, start=start, limit=count)

        async def keys(reach: int) -> tuple[list[tuple[int, int, str, int, str]], int]:
            return await service.keys(ctx.store, org, selection, reach)

        # Another shard's part of its organization-wide list (`fan_out`, step 1).
        mode = routed(request)
        if mode == fan_out.KEYS:
            found, total = await keys(params.integer(request, "limit", 1, 1, fan_out.MAX_REACH))
            return JSON({"keys": found, "total": total})
        if mode == fan_out.SLICE:
            start = params.integer(request, "start", 0, 0, fan_out.MAX_REACH)
            part = await events(start, params.integer(request, "limit", 1, 0, MAX_LIMIT))
            return JSON(shapes.events(part, org, MAX_LIMIT))
        peers = ctx.fanned_out(request)
        if peers is None:
            return JSON(shapes.events(await events((page - 1) * limit, limit), org, limit))

        async def mine(start: int, count: int) -> list[Any]:
            return list(shapes.events(await events(start, count), org, MAX_LIMIT)["items"])

        items, total = await fan_out.events(
            peers, request, keys, mine, page, limit, query.descending
        )
        return JSON({"items": items, "pagination": pagination(total, limit)})

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        found = await service.get(
            ctx.store, org, params.path_id(request), polar_version=_polar_version(request)
        )
        return JSON(shapes.event(found, org))

    return [
        ApiRoute("/v1/events/", list_, "GET", LIST),
        ApiRoute("/v1/events/{id}", get, "GET", Operation("Get an event", TAG, {200: EventShape})),
    ]
