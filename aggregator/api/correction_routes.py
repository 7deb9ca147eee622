"""Corrections of stored events (meterline's own; Polar has none): `POST /v1/events/void`,
`PATCH /v1/events/{id}` (amend), `POST /v1/events/replace`. Each is one write record, applied
whole or not at all, idempotent by its `Idempotency-Key`."""

from __future__ import annotations

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import correction_shapes as shapes
from aggregator.api import event_shapes, fan_out, params
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.correction_shapes import (
    EventAmend,
    EventReplace,
    ReplacedShape,
    VoidedShape,
    VoidJobShape,
    VoidRequest,
)
from aggregator.api.event_shapes import EventShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.services import correction_service as service
from ingest.http import JSON
from meters.wire import parse_model

TAG = "events"
VOID = Operation(
    "Void events",
    TAG,
    {200: VoidedShape, 202: VoidJobShape},
    body=VoidRequest,
    description=(
        "Voided events stop counting everywhere (quantities, customer meters, costs, lists);"
        " each keeps its external id, so sending it again stays a duplicate. Events named by"
        " `ids` or `external_ids` are voided at once (200). A `filter` (at most 1,000,000"
        " events, those stored when it was asked) is answered with a job (202), which voids"
        " them in steps: each step's events stop counting together, and its progress is read"
        f" at `GET /v1/events/void/{{id}}`. {oa.IDEMPOTENT}"
    ),
)
VOID_JOB = Operation(
    "Get a void job",
    TAG,
    {200: VoidJobShape},
    description=(
        "A void by filter, as far as it has gone: `voided` of the `matched` events so far,"
        " `done` once every one of them is voided."
    ),
)
AMEND = Operation(
    "Amend an event",
    TAG,
    {200: EventShape},
    body=EventAmend,
    description=(
        "The event's new version (the fields given replace the event's); the old one is"
        f" voided. {oa.IDEMPOTENT}"
    ),
)
REPLACE = Operation(
    "Replace the events of a range",
    TAG,
    {200: ReplacedShape},
    body=EventReplace,
    description=(
        "Applied whole or not at all. The answer says what it changed: every meter's quantity"
        " over the range (of the customer named, if any) and the consumed units of every"
        " customer meter whose meter counts an event it voids or stores, before and after."
        " With `dry_run`, nothing is changed (no record, no write): the answer says what the"
        f" replacement would do. {oa.IDEMPOTENT}"
    ),
)


def routes(ctx: ApiContext) -> list[Route]:
    store = ctx.store

    async def void(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(VoidRequest, await ctx.json(request))
        done = await service.void(
            store, org, data, ctx.actor(request), request_id=ctx.request_id(request)
        )
        if isinstance(done, service.VoidJob):
            return JSON(shapes.void_job(done), status_code=202)
        answer = shapes.voided(done)
        peers = ctx.fanned_out(request)
        if peers is not None and data.filter is None:  # each shard voided its own (`fan_out`)
            theirs = await fan_out.written(peers, request, _body(data))
            answer = shapes.merged_voids(answer, theirs)
        return JSON(answer)

    async def void_job(request: Request) -> JSON:
        org = ctx.organization(request)
        found = await service.void_job(store, org, params.path_id(request))
        return JSON(shapes.void_job(found))

    async def amend(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(EventAmend, await ctx.json(request))
        found = await service.amend(
            store,
            org,
            params.path_id(request),
            data,
            ctx.actor(request),
            ctx.rules,
            request_id=ctx.request_id(request),
        )
        return JSON(event_shapes.event(found, org))

    async def replace(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(EventReplace, await ctx.json(request))
        done = await service.replace(
            store, org, data, ctx.actor(request), ctx.rules, request_id=ctx.request_id(request)
        )
        answer = shapes.replaced(done)
        peers = ctx.fanned_out(request)
        if peers is not None and data.customer_id is None and data.external_customer_id is None:
            theirs = await fan_out.written(peers, request, _body(data))  # each its customers'
            meters = [m["meter_id"] for m in answer["meters"]]
            additive = await service.additive(store, org, meters)
            answer = shapes.merged_replacements(answer, theirs, additive)
        return JSON(answer)

    return [
        ApiRoute("/v1/events/void", void, "POST", VOID),
        ApiRoute("/v1/events/void/{id}", void_job, "GET", VOID_JOB),
        ApiRoute("/v1/events/replace", replace, "POST", REPLACE),
        ApiRoute("/v1/events/{id}", amend, "PATCH", AMEND),
    ]


def _body(data: BaseModel) -> bytes:
    """A request's body as parsed: the same request (the same record) for another shard."""
    return orjson.dumps(data.model_dump(mode="json", exclude_unset=True))
