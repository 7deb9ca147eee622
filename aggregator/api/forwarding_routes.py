"""`/v1/forwarder/`: forwarding status, the quarantine, re-sending a quarantined event, and
re-sending given events (reconcile's repair). meterline-only; only the forwarded
organization's tokens see them."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import forwarding_shapes as shapes
from aggregator.api.context import ApiContext
from aggregator.api.forwarding_shapes import (
    QuarantineShape,
    ResendEventsBody,
    ResendShape,
    ResentShape,
    StatusShape,
)
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.errors import NotFound, UsageError
from aggregator.services import forwarding_service as service
from aggregator.upstream.forwarder import Forwarder
from ingest.http import JSON, error
from meters.errors import FieldError, ValidationFailed
from meters.wire import canonical_id

TAG = "forwarder"
NOT_FORWARDED = "404 unless the token's organization is the one forwarded upstream."
RESEND = Operation(
    "Send given events upstream again (reconcile's repair)",
    TAG,
    {200: ResentShape},
    body=ResendEventsBody,
    errors=(404, 409),
    description=f"{NOT_FORWARDED} 409 in rollup mode, which forwards no raw events.",
)


def _operation(summary: str, shape: type[StatusShape | QuarantineShape | ResendShape]) -> Operation:
    return Operation(summary, TAG, {200: shape}, errors=(404,), description=NOT_FORWARDED)


def routes(
    ctx: ApiContext, forwarder: Forwarder | None, organization_id: str | None
) -> list[Route]:
    def mine(request: Request) -> Forwarder:
        # Authenticated first, as every route is: no token is a 401, forwarding on or not.
        organization = ctx.organization(request)
        if forwarder is None or organization != organization_id:
            raise NotFound("This organization's events are not forwarded")
        return forwarder

    async def status(request: Request) -> JSON:
        return JSON(shapes.status(await service.status(mine(request))))

    async def quarantine(request: Request) -> JSON:
        return JSON(shapes.quarantine(await service.quarantine(mine(request))))

    async def resend(request: Request) -> JSON:
        running = mine(request)
        try:
            seq = int(request.path_params["seq"])
        except ValueError:
            raise NotFound("Not a quarantined event") from None
        return JSON(shapes.resend(seq, await service.resend(running, seq)))

    async def resend_events(request: Request) -> JSON:
        running = mine(request)
        body = await request.body()
        # A `shapes.forwarding.ResendEventsBody`, checked here: the 422 names its one field.
        try:
            given = orjson.loads(body)["event_ids"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            given = None
        ids = [canonical_id(i) for i in given if type(i) is str] if type(given) is list else []
        if type(given) is not list or len(ids) != len(given) or None in ids:
            raise ValidationFailed(
                [
                    FieldError(
                        "list_type", ("body", "event_ids"), "Input should be a list of event ids"
                    )
                ]
            )
        try:
            resent = await service.resend_events(running, [i for i in ids if i is not None])
        except UsageError as exc:
            return error(409, "Conflict", str(exc))
        return JSON(shapes.resent(resent))

    return [
        ApiRoute("/v1/forwarder/", status, "GET", _operation("Forwarding status", StatusShape)),
        ApiRoute("/v1/forwarder/resend", resend_events, "POST", RESEND),
        ApiRoute(
            "/v1/forwarder/quarantine",
            quarantine,
            "GET",
            _operation("Events the upstream refused", QuarantineShape),
        ),
        ApiRoute(
            "/v1/forwarder/quarantine/{seq}/resend",
            resend,
            "POST",
            _operation("Send a quarantined event again", ResendShape),
        ),
    ]
