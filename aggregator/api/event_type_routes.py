"""`GET /v1/events/names`, `GET /v1/event-types/` and `PATCH /v1/event-types/{id}`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import event_type_shapes as shapes
from aggregator.api import fan_out, params
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.event_routes import SOURCES
from aggregator.api.event_type_shapes import (
    EventNameShape,
    EventTypeShape,
    EventTypeWithStatsShape,
)
from aggregator.api.openapi import ApiRoute, Operation, Param
from aggregator.api.shapes import ListResource, pagination
from aggregator.services import event_type_service as service
from aggregator.services.event_service import EventQuery
from aggregator.services.event_type_service import NAME_SORTS, TYPE_SORTS, EventTypeQuery
from aggregator.services.pages import Page
from ingest.http import JSON
from meters.event_types import EventTypeUpdate
from meters.wire import parse_model


def _signed(names: frozenset[str]) -> frozenset[str]:
    return names | {f"-{n}" for n in names}


def _query(sorts: frozenset[str], text: str) -> tuple[Param, ...]:
    """What both lists read (`listed`)."""
    return (
        *oa.page_and_limit(),
        oa.sorting(_signed(sorts), "-last_seen"),
        *oa.customers(),
        oa.repeated("source", oa.choice(SOURCES)),
        oa.query("query", oa.STRING, text),
    )


TAG = "event-types"
NAMES = Operation(
    "List event names, with their figures",
    "events",
    {200: ListResource[EventNameShape]},
    query=_query(NAME_SORTS, "text in the name, any case"),
)
LIST = Operation(
    "List event types, with their figures",
    TAG,
    {200: ListResource[EventTypeWithStatsShape]},
    query=(
        *_query(TYPE_SORTS, "text in the name or label"),
        oa.query("root_events", oa.BOOLEAN, "only events without a parent"),
        oa.query("parent_id", oa.STRING, "the children of one event (event id or external id)"),
    ),
)
UPDATE = Operation(
    "Set how an event type's events are labelled",
    TAG,
    {200: EventTypeShape},
    body=EventTypeUpdate,
)


def routes(ctx: ApiContext) -> list[Route]:
    async def listed(
        request: Request,
        org: str,
        events: EventQuery,
        sorts: frozenset[str],
        in_label: bool,
        everything: bool = False,
    ) -> tuple[Page[service.EventType], int]:
        page, limit = (1, 2**31) if everything else params.page_and_limit(request)
        query = EventTypeQuery(
            events,
            text=request.query_params.get("query"),
            text_in_label=in_label,
            sorting=tuple(params.sorting(request, _signed(sorts), "-last_seen")),
        )
        found = await service.list_(
            ctx.store,
            org,
            query,
            customer_ids=params.ids(request, "customer_id"),
            external_customer_ids=params.strings(request, "external_customer_id"),
            page=page,
            limit=limit,
        )
        return found, limit

    async def answered(
        request: Request,
        events: EventQuery,
        sorts: frozenset[str],
        in_label: bool,
        shaped: Callable[[Page[service.EventType], str, int], ListResource[Any]],
    ) -> JSON:
        org = ctx.organization(request)
        peers = ctx.fanned_out(request)
        if peers is None:
            found, limit = await listed(request, org, events, sorts, in_label)
            return JSON(shaped(found, org, limit))
        # Every type of every shard, merged, then one page of them (`fan_out`, step 2).
        page, limit = params.page_and_limit(request)
        mine, _ = await listed(request, org, events, sorts, in_label, everything=True)
        theirs = await fan_out.every_page(peers, request)
        sorting = params.sorting(request, _signed(sorts), "-last_seen")
        items, total = fan_out.names(shaped(mine, org, 1)["items"], theirs, sorting, page, limit)
        return JSON({"items": items, "pagination": pagination(total, limit)})

    async def names(request: Request) -> JSON:
        ctx.organization(request)  # before the query is read: no token is a 401
        events = EventQuery(sources=params.choices(request, "source", SOURCES))
        return await answered(
            request, events, NAME_SORTS, False, lambda p, _, limit: shapes.names(p, limit)
        )

    async def list_(request: Request) -> JSON:
        ctx.organization(request)
        roots = params.boolean(request, "root_events")
        events = EventQuery(
            sources=params.choices(request, "source", SOURCES),
            parent_id=request.query_params.get("parent_id"),
            conditions=(("parent_id IS NULL", []),) if roots else (),
        )
        return await answered(request, events, TYPE_SORTS, True, shapes.event_types)

    async def update(request: Request) -> JSON:
        org = ctx.organization(request)
        type_id = params.path_id(request)
        data = parse_model(EventTypeUpdate, await ctx.json(request))
        return JSON(
            shapes.event_type(
                await service.update(
                    ctx.store, org, type_id, data, request_id=ctx.request_id(request)
                ),
                org,
            )
        )

    return [
        ApiRoute("/v1/events/names", names, "GET", NAMES),
        ApiRoute("/v1/event-types/", list_, "GET", LIST),
        ApiRoute("/v1/event-types/{id}", update, "PATCH", UPDATE),
    ]
