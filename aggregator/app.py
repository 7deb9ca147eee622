"""Composes the HTTP application of a core: ingest (embedded publisher) plus the query API."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from aggregator.api import costs, customers, events, forwarding, ledger, meters
from aggregator.api.context import ApiContext
from aggregator.auth import TokenRegistry
from aggregator.backfill import Backfiller
from aggregator.consumer import Consumer
from aggregator.errors import MeterFailed, NotFound, QueryTimeout
from aggregator.forwarder import Forwarder
from aggregator.store import Store
from aggregator.store.events import IngestJob
from aggregator.store.writer import DEFAULT_JOB_BOUND_SECONDS
from ingest.http.app import IngestSettings, ingest_routes
from ingest.http.requests import Authenticate
from ingest.http.responses import EXCEPTION_HANDLERS, JSON, error
from ingest.ipc import read_ipc
from ingest.publish import Publisher, PublishResult
from ingest.validation import ValidationPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoreSettings:
    data_dir: Path = Path(".meterline")
    host: str = "127.0.0.1"
    port: int = 8000
    ingest: IngestSettings = field(default_factory=IngestSettings)
    token_cache_seconds: float = 2.0
    # SIGTERM to exit, at most (see cli._stop).
    drain_seconds: float = 30.0
    # The longest a write group or background chunk should hold the writer, and a read.
    job_bound_seconds: float = DEFAULT_JOB_BOUND_SECONDS
    read_timeout_seconds: float = 30.0

    @property
    def database(self) -> Path:
        return self.data_dir / "meterline.duckdb"


class EmbeddedPublisher:
    """Validates (in the pool) and stores straight into DuckDB: durable once the group commit
    that carries the request returns."""

    def __init__(self, store: Store, validation: ValidationPool) -> None:
        self._store = store
        self._validation = validation

    async def publish(
        self, organization_id: str, body: bytes, received_at_us: int
    ) -> PublishResult:
        events = read_ipc(await self._validation.validate(body, received_at_us, organization_id))
        assert self._store.seq is not None
        job = IngestJob(organization_id, events, received_at_us, self._store.seq)
        result = await self._store.write(job, weight=max(1, events.num_rows))
        return PublishResult(result.inserted, result.duplicates)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "ResourceNotFound", str(exc) or "Not found")


async def _meter_failed(request: Request, exc: Exception) -> Response:
    return error(409, "MeterFailed", str(exc))


async def _query_timeout(request: Request, exc: Exception) -> Response:
    return error(503, "QueryTimeout", str(exc), {"Retry-After": "5"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "ResourceNotFound", 405: "MethodNotAllowed"}
    return error(exc.status_code, names.get(exc.status_code, "HTTPError"), exc.detail)


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "InternalServerError", "An internal error occurred.")


async def _health(request: Request) -> JSON:
    return JSON({"status": "ok"})


def _authenticator(registry: TokenRegistry) -> Authenticate:
    def authenticate(token: str) -> str | None:
        org = registry.authenticate(token)
        return org.id if org else None

    return authenticate


def _metrics(consumer: Consumer | None, forwarder: Forwarder | None) -> Route:
    """Prometheus text: how far behind the consumer and the forwarder are, and how long the
    consumer's commits take."""

    async def metrics(request: Request) -> Response:
        lines: list[str] = []
        if forwarder is not None:
            lines += [
                "# TYPE meterline_forward_backlog_events gauge",
                f"meterline_forward_backlog_events {await forwarder.backlog()}",
                "# TYPE meterline_forward_sent_total counter",
                f"meterline_forward_sent_total {forwarder.sent}",
                "# TYPE meterline_forward_retried_total counter",
                f"meterline_forward_retried_total {forwarder.retried}",
                "# TYPE meterline_forward_quarantined_total counter",
                f"meterline_forward_quarantined_total {forwarder.refused}",
            ]
        if consumer is not None:
            lines.append("# TYPE meterline_consumer_lag_records gauge")
            for partition, lag in sorted((await consumer.lag()).items()):
                lines.append(f'meterline_consumer_lag_records{{partition="{partition}"}} {lag}')
            lines += [
                "# TYPE meterline_consumer_applied_events_total counter",
                f"meterline_consumer_applied_events_total {consumer.applied}",
                "# TYPE meterline_consumer_dead_lettered_total counter",
                f"meterline_consumer_dead_lettered_total {consumer.dead_lettered}",
                "# TYPE meterline_consumer_batch_commit_seconds summary",
            ]
            timings = sorted(consumer.commit_seconds)
            for q in (0.5, 0.99):
                value = timings[min(len(timings) - 1, int(q * len(timings)))] if timings else 0.0
                lines.append(f'meterline_consumer_batch_commit_seconds{{quantile="{q}"}} {value}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return Route("/metrics", metrics, methods=["GET"])


_HANDLERS: dict[Any, Any] = {
    **EXCEPTION_HANDLERS,
    NotFound: _not_found,
    MeterFailed: _meter_failed,
    QueryTimeout: _query_timeout,
    HTTPException: _http_error,
    Exception: _internal,
}


def build_app(
    store: Store,
    registry: TokenRegistry,
    publisher: Publisher,
    backfiller: Backfiller,
    settings: CoreSettings,
    consumer: Consumer | None = None,
    forwarder: tuple[Forwarder, str] | None = None,
) -> Starlette:
    """The core's API: ingest through `publisher`, and every query and management route."""
    authenticate = _authenticator(registry)
    ctx = ApiContext(store, authenticate, settings.ingest.max_body_bytes, backfiller)
    routes = [
        Route("/healthz", _health, methods=["GET"]),
        _metrics(consumer, forwarder[0] if forwarder else None),
        *ingest_routes(publisher, authenticate, settings.ingest),
        *events.routes(ctx),
        *ledger.routes(ctx),
        *customers.routes(ctx),
        *meters.routes(ctx),
        *costs.routes(ctx),
        *forwarding.routes(ctx, *(forwarder or (None, None))),
    ]
    return Starlette(routes=routes, exception_handlers=_HANDLERS)


def build_edge_app(
    registry: TokenRegistry, publisher: Publisher, settings: IngestSettings
) -> Starlette:
    """A stateless ingest edge: `POST /v1/events/ingest` into Kafka, nothing else."""
    routes = [
        Route("/healthz", _health, methods=["GET"]),
        *ingest_routes(publisher, _authenticator(registry), settings),
    ]
    return Starlette(routes=routes, exception_handlers=_HANDLERS)
