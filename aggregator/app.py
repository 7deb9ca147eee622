"""Composes the HTTP application of a core: ingest (embedded publisher) plus the query API."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aggregator import metrics
from aggregator.api import costs, customers, events, forwarding, ledger, meters, shapes
from aggregator.api.context import ApiContext
from aggregator.auth import TokenRegistry
from aggregator.backfill import Backfiller
from aggregator.consumer import Consumer
from aggregator.errors import KeyReused, MeterFailed, NotFound, QueryTimeout
from aggregator.forwarder import Forwarder
from aggregator.store import Store, dedupe
from aggregator.store.columns import to_ipc
from aggregator.store.events import IngestJob
from aggregator.store.writer import DEFAULT_JOB_BOUND_SECONDS
from ingest.http.admission import Admission
from ingest.http.app import IngestSettings, ingest_routes
from ingest.http.requests import Authenticate
from ingest.http.responses import EXCEPTION_HANDLERS, JSON, error
from ingest.ipc import read_ipc
from ingest.publish import Publisher, PublishResult
from ingest.validation import ValidationPool
from meters.times import now_us

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
    # Stored external ids held in memory (16 bytes each) before they spill to files.
    dedupe_memory_keys: int = dedupe.MEMORY_KEYS
    # Bearer token that `/metrics` requires (None: served to anyone who can reach the port).
    metrics_token: str | None = None

    @property
    def database(self) -> Path:
        return self.data_dir / "meterline.duckdb"


class EmbeddedPublisher:
    """Validates (in the pool) and applies in the store: durable once the group commit that
    logs the request returns (`store.ingest_log`)."""

    def __init__(self, store: Store, validation: ValidationPool) -> None:
        self._store = store
        self._validation = validation

    async def publish(
        self, organization_id: str, body: bytes, received_at_us: int
    ) -> PublishResult:
        logged = await self._validation.validate(body, received_at_us, organization_id, to_ipc)
        events = read_ipc(logged)
        job = IngestJob(organization_id, events, received_at_us, self._store.live, logged)
        result = await self._store.write(
            job, weight=max(1, events.num_rows), tenant=organization_id
        )
        return PublishResult(result.inserted, result.duplicates)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "ResourceNotFound", str(exc) or "Not found")


async def _meter_failed(request: Request, exc: Exception) -> Response:
    return error(409, "MeterFailed", str(exc))


async def _key_reused(request: Request, exc: Exception) -> Response:
    return error(409, "IdempotencyKeyReused", str(exc))


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


# An offset reset keeps the core's health "degraded" this long: someone should look.
RESET_NOTICE_US = 24 * 3600 * 1_000_000


def _core_health(consumer: Consumer | None) -> Route:
    """`ok`, or `degraded` (still 200: the core works) for a day after the events topic's log
    lost offsets the core had stored, with the latest such reset."""

    async def health(request: Request) -> JSON:
        if consumer is None:
            return JSON({"status": "ok"})
        resets = await consumer.offset_resets()
        last = resets[-1] if resets else None
        recent = last is not None and now_us() - last.at_us < RESET_NOTICE_US
        return JSON(
            {
                "status": "degraded" if recent else "ok",
                "kafka": {
                    "offset_resets": len(resets),
                    "last_offset_reset": None
                    if last is None
                    else {
                        "partition": last.partition,
                        "stored_offset": last.stored,
                        "log_start": last.start,
                        "log_end": last.end,
                        "vanished": last.vanished,
                        "reset_at": shapes.iso(last.at_us),
                    },
                },
            }
        )

    return Route("/healthz", health, methods=["GET"])


def _authenticator(registry: TokenRegistry) -> Authenticate:
    def authenticate(token: str) -> str | None:
        org = registry.authenticate(token)
        return org.id if org else None

    return authenticate


_HANDLERS: dict[Any, Any] = {
    **EXCEPTION_HANDLERS,
    NotFound: _not_found,
    MeterFailed: _meter_failed,
    KeyReused: _key_reused,
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
    limits = settings.ingest.limits
    ctx = ApiContext(
        store, authenticate, settings.ingest.max_body_bytes, limits.body_timeout_seconds, backfiller
    )
    admission = Admission(limits)
    sources = metrics.Sources(admission, store, consumer, forwarder[0] if forwarder else None)
    routes = [
        _core_health(consumer),
        metrics.route(sources, settings.metrics_token),
        *ingest_routes(publisher, authenticate, settings.ingest, admission),
        *events.routes(ctx),
        *ledger.routes(ctx),
        *customers.routes(ctx),
        *meters.routes(ctx),
        *costs.routes(ctx),
        *forwarding.routes(ctx, *(forwarder or (None, None))),
    ]
    return Starlette(routes=routes, exception_handlers=_HANDLERS)


def build_edge_app(
    registry: TokenRegistry, publisher: Publisher, settings: CoreSettings
) -> Starlette:
    """A stateless ingest edge: `POST /v1/events/ingest` into Kafka, and its own metrics."""
    admission = Admission(settings.ingest.limits)
    routes = [
        Route("/healthz", _health, methods=["GET"]),
        metrics.route(metrics.Sources(admission), settings.metrics_token),
        *ingest_routes(publisher, _authenticator(registry), settings.ingest, admission),
    ]
    return Starlette(routes=routes, exception_handlers=_HANDLERS)
