"""`GET /openapi.json`, the OpenAPI document of the routes the app serves (built on first
request, from `request.app`'s routes), and `GET /docs`, a page that renders it (`docs.html`:
no script or style from elsewhere, and its Content-Security-Policy runs no other). Also the
declarations of the routes the core takes from the edge (`/v1/events/ingest`, `/metrics`) and
of `/healthz`."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal, NotRequired

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from typing_extensions import TypedDict

from aggregator.api import openapi
from aggregator.api.openapi import Operation, Text
from aggregator.api.openapi_document import openapi_document
from ingest.http import IngestBody, IngestResult

TITLE = "meterline"
DESCRIPTION = (
    "Self-hosted usage metering with a Polar-compatible API. Every route takes"
    " `Authorization: Bearer <organization access token>` unless it says otherwise."
)


class OffsetResetShape(TypedDict):
    partition: int
    stored_offset: int
    log_start: int
    log_end: int
    vanished: int | None  # None: the log was recreated
    reset_at: str


class KafkaHealthShape(TypedDict):
    offset_resets: int
    last_offset_reset: OffsetResetShape | None


class StorageHealthShape(TypedDict):
    free_bytes: int  # on the data dir's filesystem
    full_since: str | None  # the latest write that found the disk full, until one succeeds
    reason: str | None


class HealthShape(TypedDict):
    """What `/healthz` answers (core_app's `_core_health`; an edge's is `{"status": "ok"}`):
    "degraded" while writes find the disk full, and for a day after the events topic lost
    offsets the core had stored; "failed" (503) once the database must be restarted."""

    status: Literal["ok", "degraded", "failed"]
    storage: NotRequired[StorageHealthShape]  # a core's
    kafka: NotRequired[KafkaHealthShape]  # Kafka mode


class OtlpRequest(TypedDict):
    """OTLP/JSON's `ExportTraceServiceRequest` (the protobuf encoding has the same fields)."""

    resourceSpans: list[dict[str, Any]]


class OtlpPartialSuccess(TypedDict):
    rejectedSpans: str
    errorMessage: str


class OtlpResponse(TypedDict):
    """`ExportTraceServiceResponse`: empty when every span was taken."""

    partialSuccess: NotRequired[OtlpPartialSuccess]


_EDGE: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/events/ingest"): Operation(
        "Ingest events",
        "events",
        {200: IngestResult},
        body=IngestBody,
        errors=(429,),
        description="All or nothing: every error of the batch is a 422 located at"
        ' `["body", "events", i, …]`. Answered once the events are durable; an event whose'
        " `external_id` is stored counts as a duplicate. 503 + Retry-After when overloaded."
        " Also takes CloudEvents 1.0: `application/cloudevents+json` (one) or"
        " `application/cloudevents-batch+json` (an array), errors located at the attribute.",
    ),
    ("POST", "/v1/traces"): Operation(
        "Ingest OTLP trace exports (GenAI spans as usage events)",
        "events",
        {200: OtlpResponse},
        body=OtlpRequest,
        errors=(429,),
        description="OTLP/HTTP: `application/x-protobuf` or `application/json`"
        " (`ExportTraceServiceRequest`), `Content-Encoding: gzip` or none; answered in the"
        " request's encoding. Each span that reports token usage (`gen_ai.usage.*`) becomes an"
        " event with an `_llm`, its customer from `meterline.customer.external_id` or"
        " `meterline.customer.id` (the span's, its nearest ancestor's, or the resource's);"
        " `external_id` `otel:<trace id>:<span id>`, so a repeated export adds nothing. Spans"
        " refused (no customer, a rule broken) are counted in `partialSuccess`, with why;"
        " other spans are ignored. Answered once the events are durable.",
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics",
        "system",
        {200: Text("text/plain")},
        security="metrics",
        description="Behind `--metrics-token` when the server has one.",
    ),
    ("GET", "/healthz"): Operation(
        "Liveness", "system", {200: HealthShape, 503: HealthShape}, security="none"
    ),
}


def declare_edge(routes: Sequence[Route]) -> list[Route]:
    """The edge's routes and `/healthz`, declared; any other route as it is."""
    found: list[Route] = []
    for route in routes:
        method = ",".join(sorted(set(route.methods or ()) - {"HEAD"}))
        operation = _EDGE.get((method, route.path))
        found.append(route if operation is None else openapi.declared(route, operation))
    return found


def docs_policy(page: bytes) -> str:
    """The `/docs` page's Content-Security-Policy: its own inline script and style (by their
    SHA-256, so no other inline code runs), `openapi.json` from this origin, nothing else."""

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<%b>(.*?)</%b>" % (tag, tag), page, re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')};"
        " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )


def routes(version: str) -> list[Route]:
    page = resources.files(__package__).joinpath("docs.html").read_bytes()
    headers = {
        "Content-Security-Policy": docs_policy(page),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    built: list[bytes] = []

    async def document(request: Request) -> Response:
        if not built:
            # Once per app, off the event loop: every shape's schema takes a moment.
            found = await run_in_threadpool(
                openapi_document,
                request.app.routes,
                title=TITLE,
                version=version,
                description=DESCRIPTION,
            )
            built.append(orjson.dumps(found))
        return Response(built[0], media_type="application/json")

    async def docs(request: Request) -> Response:
        return HTMLResponse(page, headers=headers)

    return [
        Route("/openapi.json", document, methods=["GET"], include_in_schema=False),
        Route("/docs", docs, methods=["GET"], include_in_schema=False),
    ]
