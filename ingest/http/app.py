"""`POST /v1/events/ingest`: authenticate, validate the whole batch, publish, answer.

Nothing is answered 2xx before the publisher says the events are durable. Under overload the
endpoint sheds load with 503 + Retry-After instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.routing import Route

from ingest.errors import Unavailable
from ingest.http.requests import Authenticate, organization_of, read_body
from ingest.http.responses import JSON
from ingest.publish import Publisher
from meters.events import EventRules, now_us

MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestSettings:
    rules: EventRules = field(default_factory=EventRules)
    max_body_bytes: int = MAX_BODY_BYTES
    # Requests validated or publishing at once; past it, 503 instead of unbounded memory.
    max_inflight: int = 64
    # Processes validating large bodies (0: validate on the event loop).
    validation_workers: int = 2
    # How long a request may wait for durability before it gets 503 (and should retry).
    deadline_seconds: float = 5.0


def ingest_routes(
    publisher: Publisher, authenticate: Authenticate, settings: IngestSettings
) -> list[Route]:
    inflight = 0

    async def ingest(request: Request) -> JSON:
        nonlocal inflight
        org = organization_of(request, authenticate)
        if inflight >= settings.max_inflight:
            raise Unavailable("Too many ingest requests in flight; retry shortly.", 1)
        inflight += 1
        try:
            body = await read_body(request, settings.max_body_bytes)
            try:
                async with asyncio.timeout(settings.deadline_seconds):
                    result = await publisher.publish(org, body, now_us())
            except TimeoutError:
                raise Unavailable(
                    "Events were not confirmed durable in time; retry with the same"
                    " external_id values (retries are deduplicated).",
                    1,
                ) from None
        finally:
            inflight -= 1
        return JSON({"inserted": result.inserted, "duplicates": result.duplicates})

    return [Route("/v1/events/ingest", ingest, methods=["POST"])]
