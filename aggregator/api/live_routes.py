"""`GET /v1/customer-meters/stream`: the organization's customer meters pushed as each commit
changes them (server-sent events), for dashboards that must not poll. meterline-only.

Events: `customer_meter` (data: the customer meter after a change, as `GET
/v1/customer-meters/{id}` answers it without the nested `customer` and `meter`), `reset`
(data `{}`: more changed than the stream could hold, or a read timed out: reload), and a
`: heartbeat` comment after every `heartbeat_seconds` without one, so that proxies'
idle-connection timeouts do not cut a quiet stream. Optional filters: `customer_id`,
`external_customer_id`, `meter_id` (repeatable). The stream ends when the server stops;
clients reconnect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from aggregator.api import fan_out, live_shapes, params
from aggregator.api import openapi as oa
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation, Text
from aggregator.errors import NotFound, QueryTimeout
from aggregator.services import live_feed as service
from aggregator.services.live_feed import LiveFeed, Subscription

# Sent first, so that a client knows the stream is open (and proxies pass the headers on).
OPENED = b": open\n\n"
HEARTBEAT = b": heartbeat\n\n"
RESET = b"event: reset\ndata: {}\n\n"
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no proxy buffering


def routes(ctx: ApiContext, feed: LiveFeed | None) -> list[Route]:
    store = ctx.store

    async def stream(request: Request) -> StreamingResponse:
        org = ctx.organization(request)
        if feed is None:
            raise NotFound("This process serves no live stream")
        feed.admit(org)
        meter_ids = params.ids(request, "meter_id")
        refs = await service.customer_refs(
            store,
            org,
            params.ids(request, "customer_id"),
            params.strings(request, "external_customer_id"),
        )

        async def events() -> AsyncIterator[bytes]:
            # Subscribed before the first byte: nothing committed after it is missed.
            with feed.subscribe(org, meter_ids, refs) as subscription:
                yield OPENED
                while not subscription.ended:
                    chunk = await _next(org, subscription, feed.heartbeat_seconds)
                    if chunk:
                        yield chunk

        peers = ctx.fanned_out(request)  # every shard's changes (`fan_out`, step 7)
        merged = (
            events()
            if peers is None
            else await fan_out.live(
                peers, request, events(), (OPENED, HEARTBEAT), feed.heartbeat_seconds
            )
        )
        return StreamingResponse(merged, media_type="text/event-stream", headers=HEADERS)

    async def _next(org: str, subscription: Subscription, heartbeat: float) -> bytes:
        update = await subscription.next(heartbeat)
        if update is None:
            return b"" if subscription.ended else HEARTBEAT
        if update.overflowed:
            return RESET
        try:
            changed = await service.changed_balances(store, org, update.pairs)
        except QueryTimeout:
            return RESET
        return b"".join(
            b"event: customer_meter\ndata: " + orjson.dumps(live_shapes.change(cm)) + b"\n\n"
            for cm in changed
        )

    return [
        ApiRoute(
            "/v1/customer-meters/stream",
            stream,
            "GET",
            Operation(
                "Customer meters as commits change them (server-sent events)",
                "customer-meters",
                {200: Text("text/event-stream")},
                query=(*oa.customers(), oa.repeated("meter_id", oa.ID)),
                errors=(404, 503),
                description=__doc__ or "",
            ),
        )
    ]
