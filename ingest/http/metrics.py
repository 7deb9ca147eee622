"""`GET /metrics` in Prometheus text: what each part of a process is holding back or refusing.
The edge's admission figures, then whatever the process adds (the core: store, consumer,
forwarder). Behind a bearer token when one is configured (the figures name organizations)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ingest.http.admission import Admission
from ingest.http.responses import unauthorized

# Lines of Prometheus text about one part of the process.
Source = Callable[[], Awaitable[list[str]]]


def metrics_route(admission: Admission, token: str | None, sources: Sequence[Source] = ()) -> Route:
    async def metrics(request: Request) -> Response:
        if token is not None and not _authorized(request, token):
            return unauthorized()
        lines = _admission(admission)
        for source in sources:
            lines += await source()
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return Route("/metrics", metrics, methods=["GET"])


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
        " token_rate, organization_rate, organization_inflight, inflight, organization_bytes,"
        " buffered_bytes, body_timeout)",
        "# TYPE meterline_ingest_refused_total counter",
    ]
    for (reason, org), count in sorted(admission.refused.items()):
        lines.append(
            f'meterline_ingest_refused_total{{reason="{reason}",organization_id="{org}"}} {count}'
        )
    return lines
