"""`GET /v1/events/` and `GET /v1/events/{id}`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import event_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api import params
from aggregator.api.context import ApiContext
from aggregator.api.event_shapes import EventShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.services import event_service as service
from aggregator.services.event_service import EventQuery
from ingest.http import JSON
from meters.errors import FieldError, ValidationFailed

SORTS = frozenset({"timestamp", "-timestamp"})
SOURCES = frozenset({"user", "system"})
# Polar's shortest `query`.
MIN_QUERY = 3
# Polar's bound on `depth`.
MAX_DEPTH = 5


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
        )
        found = await service.list_(
            ctx.store,
            org,
            query,
            meter_id=params.one_id(request, "meter_id"),
            matching=params.meter_filter(request, "filter"),
            text=_search_text(request),
            customer_ids=customer_ids,
            external_customer_ids=external_ids,
            page=page,
            limit=limit,
        )
        return JSON(shapes.events(found, org, limit))

    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        found = await service.get(ctx.store, org, params.path_id(request))
        return JSON(shapes.event(found, org))

    return [
        ApiRoute("/v1/events/", list_, "GET", LIST),
        ApiRoute("/v1/events/{id}", get, "GET", Operation("Get an event", TAG, {200: EventShape})),
    ]
