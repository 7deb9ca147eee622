"""`POST /v1/events/ingest` (and OpenMeter's `POST /api/v1/events`, CloudEvents): authenticate,
validate the whole batch, publish, answer; and the stateless edge app that serves them alone
(the core mounts the same routes in its own app).

Nothing is answered 2xx before the publisher says the events are durable. Under overload the
endpoint sheds load with 503 + Retry-After instead of queueing without bound, and a tenant past
its rate or its share of capacity gets 429 + Retry-After (`admission`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Required

import orjson
from pydantic import ConfigDict, with_config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typing_extensions import TypedDict

from ingest.errors import Unavailable
from ingest.http.admission import Admission
from ingest.http.cloudevents import CLOUDEVENTS_MEDIA, OPENMETER_PATH, CloudEventsBody
from ingest.http.cores import Cores
from ingest.http.metrics import Responses, count_responses, metrics_route
from ingest.http.otlp import OTLP_PATH, OtlpTraces, Spans
from ingest.http.positions import EVENTS_AFTER_HEADER, Acknowledged, format_positions
from ingest.http.pricing import Unpriced
from ingest.http.protocol import Gate
from ingest.http.requests import Authenticate, authenticated
from ingest.http.responses import JSON, TOKENS_ON_CONTROL_TOPIC, ErrorMap, raw_closing, refused
from ingest.publish import Progress, Publisher
from ingest.settings import IngestSettings, Limits, OtlpSettings
from meters.errors import ValidationFailed
from meters.pricing import Pricing
from meters.times import now_us

log = logging.getLogger(__name__)

_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")


@with_config(ConfigDict(use_attribute_docstrings=True))
class IngestEvent(TypedDict, total=False):
    """An event as the endpoint takes it (Polar's `EventCreate`). `meters.events` validates it;
    its limits are the deployment's `EventRules`. `organization_id` and `member_id` are
    refused, with a reason. A null is an absent field."""

    name: Required[str]
    timestamp: str | int | float | None
    """ISO 8601 with an offset, or epoch seconds (milliseconds above 2e10); default: now."""
    customer_id: str | None
    """A UUID4: set it or external_customer_id, not both."""
    external_customer_id: str | None
    external_id: str | None
    """The idempotency key: an event whose external_id is stored is a duplicate."""
    parent_id: str | None
    """The parent's event id or external_id."""
    external_member_id: str | None
    metadata: dict[str, str | int | float | bool | dict[str, Any]] | None
    """Flat values; `_cost` ({amount, currency}) and `_llm` (token counts) are objects."""


class IngestBody(TypedDict):
    events: list[IngestEvent]


class IngestResult(TypedDict):
    inserted: int
    duplicates: int


# An ingest's answer, and the headers it goes with.
Published = tuple[IngestResult, dict[str, str]]


class Converter(Protocol):
    """A body of another format: turned into an ingest body, its errors located in it."""

    def convert(self, raw: bytes) -> bytes: ...

    def relocate(self, exc: ValidationFailed) -> ValidationFailed: ...


def ingest_routes(
    publisher: Publisher,
    authenticate: Authenticate,
    settings: IngestSettings,
    front: Front,
    otlp_of: Callable[[str], Awaitable[OtlpSettings]] | None = None,
    pricing_of: Callable[[str], Pricing | None] | None = None,
) -> list[Route]:
    """`POST /v1/events/ingest` (meterline's JSON, or CloudEvents by Content-Type), OpenMeter's
    `POST /api/v1/events` (CloudEvents only, 204) and OTLP's `POST /v1/traces`
    (`ingest.http.otlp`). `pricing_of` gives an organization's pricing settings (in memory:
    it is asked once a request), which price its `_llm` events without `_cost`."""
    admission = front.admission

    async def publish(request: Request, converter: Converter | None) -> Published:
        token, org = authenticated(request, authenticate)
        admission.check_rate(token, org)
        body = await admission.read_body(request, org, settings.max_body_bytes)
        try:
            data = body.data if converter is None else converter.convert(body.data)
            async with admission.slot(org):
                started = time.monotonic()
                progress = Progress()
                try:
                    async with asyncio.timeout(settings.deadline_seconds):
                        pricing = None if pricing_of is None else pricing_of(org)
                        result = await publisher.publish(org, data, now_us(), progress, pricing)
                except ValidationFailed as exc:
                    if converter is None:
                        raise
                    raise converter.relocate(exc) from None
                except TimeoutError:
                    log.warning(
                        "ingest request of organization %s (%d bytes) answered 503 after %.2f s:"
                        " not durable within the deadline (--deadline-seconds %g), still"
                        " waiting for %s",
                        org,
                        len(data),
                        time.monotonic() - started,
                        settings.deadline_seconds,
                        progress.waiting_for,
                    )
                    raise Unavailable(
                        "Events were not confirmed durable in time; retry with the same"
                        " external_id values (retries are deduplicated).",
                        1,
                    ) from None
                except Unavailable as exc:
                    log.warning(
                        "ingest request of organization %s answered 503 after %.2f s: %s",
                        org,
                        time.monotonic() - started,
                        exc,
                    )
                    raise
        finally:
            body.release()
        admission.charge_events(token, org, result.inserted + result.duplicates)
        front.unpriced.add(org, result.unpriced)
        headers = {}
        if result.positions:  # Kafka: where the events are (`positions`, steps 1 and 2)
            front.acknowledged.add(org, result.positions)
            headers[EVENTS_AFTER_HEADER] = format_positions(dict(result.positions))
        return IngestResult(inserted=result.inserted, duplicates=result.duplicates), headers

    async def ingest(request: Request) -> JSON:
        # Content-Type first: the JSON path takes no other step than before.
        media = request.headers.get("content-type", "")
        converter = CloudEventsBody(media) if media.startswith(CLOUDEVENTS_MEDIA) else None
        result, headers = await publish(request, converter)
        return JSON(result, headers=headers)

    async def openmeter(request: Request) -> Response:
        media = request.headers.get("content-type", "")
        _, headers = await publish(request, CloudEventsBody(media))
        return Response(status_code=204, headers=headers)

    async def traces(request: Request) -> Response:
        _, org = authenticated(request, authenticate)  # a 401 before anything is read
        chosen = settings.otlp if otlp_of is None else await otlp_of(org)
        otlp = OtlpTraces(
            request.headers, chosen, settings.rules, settings.max_body_bytes, now_us()
        )
        try:
            await publish(request, otlp)
        finally:
            for outcome, count in otlp.outcomes.items():
                front.spans[outcome, org] += count
        letters = [
            (why, orjson.dumps({**event, "organization_id": org})) for why, event in otlp.letters
        ]
        await publisher.dead_letter(org, letters)
        return otlp.answer()

    return [
        Route("/v1/events/ingest", ingest, methods=["POST"]),
        Route(OPENMETER_PATH, openmeter, methods=["POST"]),
        Route(OTLP_PATH, traces, methods=["POST"]),
    ]


@dataclass(frozen=True, slots=True)
class Front:
    """What a process's HTTP application and its protocol share: who may use ingest capacity
    (`admission`) and the count of responses per status (`responses`, for /metrics), so that a
    request the protocol answers from its headers (`gate`) is counted and limited as the
    application would."""

    admission: Admission
    responses: Responses = field(default_factory=Responses)
    # Where the events acknowledged to each organization are (Kafka: `positions`).
    acknowledged: Acknowledged = field(default_factory=Acknowledged)
    spans: Spans = field(default_factory=Counter)  # OTLP spans per outcome and organization
    unpriced: Unpriced = field(default_factory=Unpriced)  # `_llm` events pricing could not price

    @classmethod
    def of(cls, limits: Limits) -> Front:
        return cls(Admission(limits))

    def gate(self, authenticate: Authenticate) -> Gate:
        """For the protocol (`http_protocol`): an ingest request that admission refuses from its
        headers (its token's or organization's rate, its organization's share of in-flight
        requests or of buffered bytes, the whole in-flight budget) is answered 429 or 503 and
        its connection closed, before its body is read. Anything else, a missing or unknown
        token included, goes to the application, which answers as before."""
        admission, responses = self.admission, self.responses
        paths = {b"/v1/events/ingest", OPENMETER_PATH.encode(), OTLP_PATH.encode()}

        def gate(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes | None:
            if method != b"POST" or path not in paths:
                return None
            found = dict(headers)
            scheme, _, token = found.get(b"authorization", b"").decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None
            org = authenticate(token)
            if org is None:
                return None
            length = found.get(b"content-length", b"")
            refusal = admission.refusal(token, org, int(length) if length.isdigit() else None)
            if refusal is None:
                return None
            answer = refused(refusal)
            responses[answer.status_code] += 1
            return raw_closing(answer)

        return gate


def edge_app(
    publisher: Publisher,
    authenticate: Authenticate,
    settings: IngestSettings,
    metrics_token: str | None,
    front: Front | None = None,
    cores: Cores | None = None,
    otlp_of: Callable[[str], Awaitable[OtlpSettings]] | None = None,
    pricing_of: Callable[[str], Pricing | None] | None = None,
) -> Starlette:
    """A stateless ingest edge: the ingest routes into `publisher`, and its own metrics; every
    other request sent to the `cores` (none: 404)."""
    front = front or Front.of(settings.limits)
    admission, responses = front.admission, front.responses
    routes = [
        Route("/healthz", _health, methods=["GET"]),
        metrics_route(admission, metrics_token, [front.unpriced.metrics], responses, front.spans),
        *ingest_routes(publisher, authenticate, settings, front, otlp_of, pricing_of),
    ]
    if cores is not None:
        routes.append(Route("/{path:path}", cores.handle, methods=list(_METHODS)))
    return Starlette(
        routes=routes,
        exception_handlers=ErrorMap(TOKENS_ON_CONTROL_TOPIC).handlers,
        middleware=[count_responses(responses)],
    )


async def _health(request: Request) -> JSON:
    return JSON({"status": "ok"})
