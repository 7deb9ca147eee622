"""`GET /metrics` in Prometheus text: what each part of a process is holding back or refusing.
The edge's admission figures and the responses sent by status, then whatever the process adds
(the core: store, consumer, forwarder, webhooks). Behind a bearer token when one is configured
(the figures name organizations)."""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.http.admission import Admission
from ingest.http.otlp import OUTCOMES
from ingest.http.responses import unauthorized

# Lines of Prometheus text about one part of the process.
Source = Callable[[], Awaitable[list[str]]]


# HTTP responses sent, by status code: counted by `count_responses`, shown by `metrics_route`.
Responses = Counter[int]


def metrics_route(
    admission: Admission,
    token: str | None,
    sources: Sequence[Source] = (),
    responses: Responses | None = None,
    spans: Counter[tuple[str, str]] | None = None,
) -> Route:
    async def metrics(request: Request) -> Response:
        if token is not None and not _authorized(request, token):
            return unauthorized()
        lines = _admission(admission)
        if responses is not None:
            lines += _responses(responses)
        if spans is not None:
            lines += _spans(spans)
        for source in sources:
            lines += await source()
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return Route("/metrics", metrics, methods=["GET"])


def count_responses(responses: Responses) -> Middleware:
    """The app's middleware that counts into `responses` every response it sends."""
    return Middleware(_CountResponses, responses=responses)


class _CountResponses:
    def __init__(self, app: ASGIApp, responses: Responses) -> None:
        self.app = app
        self.responses = responses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.responses[message["status"]] += 1
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            # Answered 500 further out (Starlette's outermost middleware), past this one.
            if not started:
                self.responses[500] += 1
            raise


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


def _admission(admission: Admission) -> list[str]:
    lines = [
        "# TYPE meterline_ingest_inflight_requests gauge",
        f"meterline_ingest_inflight_requests {admission.inflight}",
        "# TYPE meterline_ingest_buffered_bytes gauge",
        f"meterline_ingest_buffered_bytes {admission.buffered_bytes}",
        "# HELP meterline_ingest_refused_total ingest requests refused by a limit (reason:"
        f' {", ".join(Admission.REASONS)}; each at 0 under organization_id="" from the start)',
        "# TYPE meterline_ingest_refused_total counter",
    ]
    refused = {(reason, ""): 0 for reason in Admission.REASONS} | dict(admission.refused)
    for (reason, org), count in sorted(refused.items()):
        lines.append(
            f'meterline_ingest_refused_total{{reason="{reason}",organization_id="{org}"}} {count}'
        )
    lines += [
        "# HELP meterline_ingest_accepted_events_total events answered 2xx at ingest (stored, or"
        " repeats of stored ones)",
        "# TYPE meterline_ingest_accepted_events_total counter",
        f"meterline_ingest_accepted_events_total {admission.accepted_events}",
    ]
    return lines


def _responses(responses: Responses) -> list[str]:
    return [
        "# HELP meterline_http_responses_total HTTP responses sent, by status code",
        "# TYPE meterline_http_responses_total counter",
        *(
            f'meterline_http_responses_total{{code="{c}"}} {n}'
            for c, n in sorted(responses.items())
        ),
    ]


def _spans(spans: Counter[tuple[str, str]]) -> list[str]:
    lines = [
        "# HELP meterline_otlp_spans_total spans of OTLP trace exports, by outcome: event (a"
        " usage event), no_customer and invalid (refused, in the export's partial success),"
        ' ignored (no token usage); each at 0 under organization_id="" from the start',
        "# TYPE meterline_otlp_spans_total counter",
    ]
    counted = {(outcome, ""): 0 for outcome in OUTCOMES} | dict(spans)
    for (outcome, org), count in sorted(counted.items()):
        lines.append(
            f'meterline_otlp_spans_total{{outcome="{outcome}",organization_id="{org}"}} {count}'
        )
    return lines
