"""`POST /v1/events/ingest`: authenticate, validate the whole batch, publish, answer; and the
stateless edge app that serves it alone (the core mounts the same routes in its own app).

Nothing is answered 2xx before the publisher says the events are durable. Under overload the
endpoint sheds load with 503 + Retry-After instead of queueing without bound, and a tenant past
its rate or its share of capacity gets 429 + Retry-After (`admission`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from ingest.errors import Unavailable
from ingest.http.admission import Admission, Limits
from ingest.http.metrics import metrics_route
from ingest.http.requests import Authenticate, authenticated
from ingest.http.responses import JSON, ErrorMap
from ingest.publish import Publisher
from meters.events import EventRules
from meters.times import now_us

MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestSettings:
    rules: EventRules = field(default_factory=EventRules)
    max_body_bytes: int = MAX_BODY_BYTES
    # Rates, shares and deadlines that keep tenants from stopping each other.
    limits: Limits = field(default_factory=Limits)
    # Processes validating large bodies (0: validate on the event loop).
    validation_workers: int = 2
    # How long a request may wait for durability before it gets 503 (and should retry).
    deadline_seconds: float = 5.0


def ingest_routes(
    publisher: Publisher, authenticate: Authenticate, settings: IngestSettings, admission: Admission
) -> list[Route]:
    async def ingest(request: Request) -> JSON:
        token, org = authenticated(request, authenticate)
        admission.check_rate(token, org)
        body = await admission.read_body(request, org, settings.max_body_bytes)
        try:
            async with admission.slot(org):
                try:
                    async with asyncio.timeout(settings.deadline_seconds):
                        result = await publisher.publish(org, body.data, now_us())
                except TimeoutError:
                    raise Unavailable(
                        "Events were not confirmed durable in time; retry with the same"
                        " external_id values (retries are deduplicated).",
                        1,
                    ) from None
        finally:
            body.release()
        admission.charge_events(token, org, result.inserted + result.duplicates)
        return JSON({"inserted": result.inserted, "duplicates": result.duplicates})

    return [Route("/v1/events/ingest", ingest, methods=["POST"])]


def edge_app(
    publisher: Publisher,
    authenticate: Authenticate,
    settings: IngestSettings,
    metrics_token: str | None,
) -> Starlette:
    """A stateless ingest edge: `POST /v1/events/ingest` into `publisher`, and its own metrics."""
    admission = Admission(settings.limits)
    routes = [
        Route("/healthz", _health, methods=["GET"]),
        metrics_route(admission, metrics_token),
        *ingest_routes(publisher, authenticate, settings, admission),
    ]
    return Starlette(routes=routes, exception_handlers=ErrorMap().handlers)


async def _health(request: Request) -> JSON:
    return JSON({"status": "ok"})
