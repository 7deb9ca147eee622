"""`/v1/forwarder/`: forwarding status, the quarantine, and re-sending a quarantined event
(meterline-only). Only the forwarded organization's tokens see them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api.context import ApiContext
from aggregator.errors import NotFound
from aggregator.forwarder import Forwarder
from ingest.http.responses import JSON


def routes(
    ctx: ApiContext, forwarder: Forwarder | None, organization_id: str | None
) -> list[Route]:
    def mine(request: Request) -> Forwarder:
        if forwarder is None or ctx.organization(request) != organization_id:
            raise NotFound("This organization's events are not forwarded")
        return forwarder

    async def status(request: Request) -> JSON:
        running = mine(request)
        return JSON(
            {
                "backlog": await running.backlog(),
                "sent": running.sent,
                "retried": running.retried,
                "quarantined": running.refused,
                "mode": running.mode,
                "last_error": running.last_error,
            }
        )

    async def quarantine(request: Request) -> JSON:
        rows = await mine(request).quarantined()
        return JSON(
            {"items": [{"seq": p.seq, "reason": reason, "event": p.event} for p, reason in rows]}
        )

    async def resend(request: Request) -> JSON:
        running = mine(request)
        try:
            seq = int(request.path_params["seq"])
        except ValueError:
            raise NotFound("Not a quarantined event") from None
        result = await running.resend(seq)
        if result == "not quarantined":
            raise NotFound("Not a quarantined event")
        return JSON({"seq": seq, "result": result})

    return [
        Route("/v1/forwarder/", status, methods=["GET"]),
        Route("/v1/forwarder/quarantine", quarantine, methods=["GET"]),
        Route("/v1/forwarder/quarantine/{seq}/resend", resend, methods=["POST"]),
    ]
