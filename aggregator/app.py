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

from aggregator.api import customers, events, meters
from aggregator.api.context import ApiContext
from aggregator.auth import TokenRegistry
from aggregator.backfill import Backfiller
from aggregator.errors import NotFound
from aggregator.store import Store
from aggregator.store.columns import from_ipc
from aggregator.store.events import IngestJob
from ingest.http.app import IngestSettings, ingest_routes
from ingest.http.responses import EXCEPTION_HANDLERS, JSON, error
from ingest.publish import PublishResult
from ingest.validation import ValidationPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoreSettings:
    data_dir: Path = Path(".meterline")
    host: str = "127.0.0.1"
    port: int = 8000
    ingest: IngestSettings = field(default_factory=IngestSettings)
    token_cache_seconds: float = 2.0

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
        events = from_ipc(await self._validation.validate(body, received_at_us, organization_id))
        assert self._store.seq is not None
        job = IngestJob(organization_id, events, received_at_us, self._store.seq)
        result = await self._store.write(job, weight=max(1, events.num_rows))
        return PublishResult(result.inserted, result.duplicates)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "ResourceNotFound", str(exc) or "Not found")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "ResourceNotFound", 405: "MethodNotAllowed"}
    return error(exc.status_code, names.get(exc.status_code, "HTTPError"), exc.detail)


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "InternalServerError", "An internal error occurred.")


async def _health(request: Request) -> JSON:
    return JSON({"status": "ok"})


def build_app(
    store: Store,
    registry: TokenRegistry,
    validation: ValidationPool,
    backfiller: Backfiller,
    settings: CoreSettings,
) -> Starlette:
    def authenticate(token: str) -> str | None:
        org = registry.authenticate(token)
        return org.id if org else None

    ctx = ApiContext(store, authenticate, settings.ingest.max_body_bytes, backfiller)
    routes = [
        Route("/healthz", _health, methods=["GET"]),
        *ingest_routes(EmbeddedPublisher(store, validation), authenticate, settings.ingest),
        *events.routes(ctx),
        *customers.routes(ctx),
        *meters.routes(ctx),
    ]
    handlers: dict[Any, Any] = {
        **EXCEPTION_HANDLERS,
        NotFound: _not_found,
        HTTPException: _http_error,
        Exception: _internal,
    }
    return Starlette(routes=routes, exception_handlers=handlers)
