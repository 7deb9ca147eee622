"""Composes the HTTP application of a core: the edge's ingest routes (into whichever publisher
the core runs) plus the query and management API, and the core's errors on the edge's map."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import duckdb
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from aggregator import core_metrics
from aggregator.api import (
    alert_routes,
    alert_shapes,
    cluster_routes,
    correction_routes,
    cost_routes,
    customer_portal_routes,
    customer_routes,
    dead_letter_routes,
    event_routes,
    event_type_routes,
    export_routes,
    forwarding_routes,
    hold_routes,
    ledger_routes,
    ledger_shapes,
    live_routes,
    meter_routes,
    openapi_routes,
    organization_routes,
    otlp_routes,
    pricing_routes,
    shapes,
    topup_routes,
    webhook_routes,
)
from aggregator.api.context import ApiContext
from aggregator.api.openapi import Operation, declared
from aggregator.api.openapi_routes import HealthShape, StorageHealthShape
from aggregator.api.read_after import Applied, EventsApplied, read_after
from aggregator.api.shard_routing import Sharding, shard_routing
from aggregator.auth import TokenRegistry
from aggregator.background import Backfiller
from aggregator.commands.common import version
from aggregator.console import routes as console_routes
from aggregator.errors import (
    CustomerElsewhere,
    ExternalIdNamed,
    InsufficientBalance,
    KeyReused,
    LimitReached,
    MeterFailed,
    NotFound,
    NotLeading,
    OutcomeUnreadable,
    QueryTimeout,
    ShardRefused,
    ShardUnavailable,
    StorageFull,
    WriteTimeout,
)
from aggregator.export.exporter import Exporter
from aggregator.intake.consumer import Consumer
from aggregator.intake.members import Member, alone
from aggregator.services import ledger_service, otlp_service
from aggregator.services.live_feed import LiveFeed
from aggregator.settings import CoreSettings
from aggregator.store import (
    Balances,
    Firing,
    Store,
    disk_full,
)
from aggregator.upstream.forwarder import Forwarder
from ingest.http import (
    JSON,
    OPENMETER_PATH,
    TOKENS_IN_DATA_DIR,
    TOKENS_ON_CONTROL_TOPIC,
    CloudEvent,
    ErrorMap,
    Front,
    PerOrganization,
    Source,
    count_responses,
    error,
    ingest_routes,
    metrics_route,
)
from ingest.kafka import KafkaSettings
from ingest.publish import Publisher
from meters.times import now_us

log = logging.getLogger(__name__)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "ResourceNotFound", 405: "MethodNotAllowed"}
    name = names.get(exc.status_code, "HTTPError")
    return error(exc.status_code, name, exc.detail, dict(exc.headers or {}))  # 405: Allow


def methods_checked(routes: list[BaseRoute]) -> Middleware:
    """405 with every allowed method in `Allow` for a method a fixed path does not take, before
    routing: else a path parameter's route takes the path (`GET /v1/events/ingest` answered as
    `/v1/events/{id}`, about an id), or the first route of the path names its methods alone."""
    allowed: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, Route) and route.methods and not route.param_convertors:
            allowed.setdefault(route.path, set()).update(route.methods)
    return Middleware(_MethodsChecked, allowed={p: frozenset(m) for p, m in allowed.items()})


class _MethodsChecked:
    def __init__(self, app: ASGIApp, allowed: dict[str, frozenset[str]]) -> None:
        self.app, self._allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self._allowed.get(scope["path"]) if scope["type"] == "http" else None
        if methods is not None and scope["method"] not in methods:
            allow = {"Allow": ", ".join(sorted(methods))}
            refused = error(405, "MethodNotAllowed", "Method Not Allowed", allow)
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _shard_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ShardRefused)
    return Response(exc.body, exc.status, media_type="application/json")


async def _internal(request: Request, exc: Exception) -> Response:
    if disk_full(exc):  # outside the store's writes: the token registry, the ingest log
        log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
        return error(503, "StorageFull", str(StorageFull(str(exc))), {"Retry-After": "30"})
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "InternalServerError", "An internal error occurred.")


# An offset reset keeps the core's health "degraded" this long: someone should look.
RESET_NOTICE_US = 24 * 3600 * 1_000_000


def _core_health(store: Store, consumer: Consumer | None) -> Route:
    """`ok`, or `degraded` (still 200: reads work) while writes find the disk full, and for a
    day after the events topic's log lost offsets the core had stored, with the latest such
    reset; 503 `failed` once DuckDB invalidated the database (`disk.fatal`): restart it."""

    async def health(request: Request) -> JSON:
        failure = store.disk.failure
        storage: StorageHealthShape = {
            "free_bytes": store.disk.free_bytes(),
            "full_since": None if failure is None else shapes.iso(failure.at_us),
            "reason": None if failure is None else failure.reason,
        }
        found: HealthShape = {"status": "ok" if failure is None else "degraded", "storage": storage}
        lost = store.disk.lost_database
        if lost is not None:  # nothing works until a restart: say so to whatever restarts it
            storage["full_since"], storage["reason"] = shapes.iso(lost.at_us), lost.reason
            return JSON({**found, "status": "failed"}, status_code=503)
        if consumer is None:
            return JSON(found)
        resets = await consumer.offset_resets()
        last = resets[-1] if resets else None
        if last is not None and now_us() - last.at_us < RESET_NOTICE_US:
            found["status"] = "degraded"
        found["kafka"] = {
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
        }
        return JSON(found)

    return Route("/healthz", health, methods=["GET"])


_OPENMETER_INGEST = Operation(
    "Ingest CloudEvents (OpenMeter's path)",
    "events",
    {204: None},
    body=CloudEvent | list[CloudEvent],
    errors=(429,),
    description="OpenMeter's ingest: one CloudEvent (`application/cloudevents+json`, or"
    " `application/json`) or an array (`application/cloudevents-batch+json`, or"
    " `application/json`), applied as `POST /v1/events/ingest` applies events; 204 once durable."
    ' A 422 is located at the attribute: `["body", i, "subject"]` (one event: `["body", …]`).',
)


def _openmeter_declared(routes: list[Route]) -> list[Route]:
    return [declared(r, _OPENMETER_INGEST) if r.path == OPENMETER_PATH else r for r in routes]


def _errors(kafka: KafkaSettings | None) -> ErrorMap:
    errors = ErrorMap(TOKENS_IN_DATA_DIR if kafka is None else TOKENS_ON_CONTROL_TOPIC)
    errors.register(NotFound, 404, "ResourceNotFound", default_detail="Not found")
    errors.register(MeterFailed, 409, "MeterFailed")
    errors.register(KeyReused, 409, "IdempotencyKeyReused")
    errors.register(OutcomeUnreadable, 409, "OutcomeUnreadable")
    errors.register(WriteTimeout, 504, "WriteTimeout")
    errors.register(InsufficientBalance, 409, "insufficient_balance")
    errors.register(LimitReached, 409, "LimitReached")
    errors.register(QueryTimeout, 503, "QueryTimeout", headers={"Retry-After": "5"})
    errors.register(StorageFull, 503, "StorageFull", headers={"Retry-After": "30"})
    errors.register(NotLeading, 503, "NotLeading", headers={"Retry-After": "1"})
    errors.register(ExternalIdNamed, 409, "ExternalIdInUse")
    errors.register(CustomerElsewhere, 421, "CustomerElsewhere")
    errors.register(ShardUnavailable, 503, "ShardUnavailable", headers={"Retry-After": "1"})
    errors.register_handler(ShardRefused, _shard_refused)
    errors.register_handler(HTTPException, _http_error)
    errors.register_handler(Exception, _internal)
    return errors


def alert_payload(
    con: duckdb.DuckDBPyConnection, balances: Balances, fired: list[Firing], at_us: int
) -> list[dict[str, Any]]:
    """`meter.alert` events' data (`alert_tables.Payload`): each alert, and Polar's
    CustomerMeter as the change that fired it at `at_us` left it (made inside that change's
    transaction, for all of a change's firings at once)."""
    pairs = list(dict.fromkeys((f.customer_id, f.meter.id) for f in fired))
    organization_id = fired[0].alert.organization_id
    views = ledger_service.views_on(con, balances, organization_id, pairs, at_us)
    by_pair = dict(zip(pairs, views, strict=True))
    data = []
    for f in fired:
        view = by_pair[(f.customer_id, f.meter.id)]
        balance = replace(view.balance, consumed=f.consumed, credited=f.credited)
        data.append(
            {
                "alert": alert_shapes.alert(f.alert),
                "customer_meter": ledger_shapes.customer_meter(replace(view, balance=balance)),
            }
        )
    return data


def state_payload(
    con: duckdb.DuckDBPyConnection, balances: Balances, organization_id: str, customer_id: str
) -> dict[str, Any] | None:
    """A customer.state_changed event's data (`webhook_tables.StatePayload`): Polar's
    CustomerState as it is now; None for a customer deleted since."""
    found = ledger_service.state_on(con, balances, organization_id, customer_id)
    return None if found is None else dict(ledger_shapes.state(found))


def build_app(
    store: Store,
    registry: TokenRegistry,
    publisher: Publisher,
    backfiller: Backfiller,
    settings: CoreSettings,
    consumer: Consumer | None = None,
    forwarder: tuple[Forwarder, str] | None = None,
    feed: LiveFeed | None = None,
    kafka: KafkaSettings | None = None,
    front: Front | None = None,
    sessions_published: Callable[[], Awaitable[None]] | None = None,
    members: Callable[[], Awaitable[list[Member]]] | None = None,
    applied: Applied | None = None,
    sharding: Sharding | None = None,
    figures: Sequence[Source] = (),
    exporter: Exporter | None = None,
) -> Starlette:
    """The core's API: ingest through `publisher`, and every query and management route; the
    live stream with a `feed`, dead letters with `kafka` (Kafka mode), and customer sessions
    answered once `sessions_published` returns (Kafka mode: they are on the control topic);
    `members`: the cores `GET /v1/cluster/` lists (Kafka mode: `intake.members`; else this
    core alone); `applied`: how far the control topic is applied here (Kafka mode), what reads
    after writes wait for (`api.read_after`); `sharding`: a shard of several sends the
    requests of other shards' customers there, and merges organization-wide reads with theirs
    (`api.shard_routing`); `figures`: more of `/metrics` (the journal's lag, the snapshots:
    `core_metrics`); `exporter`: the lakehouse export (`--export-to`), its status route and
    figures."""
    authenticate = registry.organization_id
    limits = settings.ingest.limits
    ctx = ApiContext(
        store,
        authenticate,
        settings.ingest.max_body_bytes,
        limits.body_timeout_seconds,
        backfiller,
        settings.quotas,
        sharding.peers if sharding is not None else None,
        settings.ingest.rules,
    )
    front = front or Front.of(limits)
    admission, responses = front.admission, front.responses
    sources: list[Source] = [front.unpriced.metrics]  # ingest's, as an edge shows them
    sources += core_metrics.sources(store, consumer, forwarder[0] if forwarder else None)
    sources += figures
    if exporter is not None:
        sources.append(core_metrics.export(exporter))
    routes = [
        *openapi_routes.declare_edge(
            [
                _core_health(store, consumer),
                metrics_route(admission, settings.metrics_token, sources, responses, front.spans),
                *_openmeter_declared(
                    ingest_routes(
                        publisher,
                        authenticate,
                        settings.ingest,
                        front,
                        PerOrganization(
                            settings.ingest.otlp,
                            lambda org: otlp_service.settings_of(store, org),
                        ),
                        store.pricing_of,
                    )
                ),
            ]
        ),
        *otlp_routes.routes(ctx),
        *pricing_routes.routes(ctx, front.unpriced),
        *event_type_routes.routes(ctx),  # before /v1/events/{id}, which would take "names"
        *event_routes.routes(ctx),
        *correction_routes.routes(ctx),
        *live_routes.routes(ctx, feed),  # before /v1/customer-meters/{id}
        *ledger_routes.routes(ctx),
        *hold_routes.routes(ctx),
        *alert_routes.routes(ctx),
        *topup_routes.routes(ctx),
        *webhook_routes.routes(ctx, settings.webhooks.allow_private),
        *customer_routes.routes(ctx),
        *meter_routes.routes(ctx),
        *cost_routes.routes(ctx),
        *organization_routes.routes(ctx, registry.with_created_at),
        *customer_portal_routes.routes(
            ctx,
            registry,
            timedelta(seconds=settings.customer_session_seconds),
            sessions_published,
        ),
        *forwarding_routes.routes(ctx, *(forwarder or (None, None))),
        *export_routes.routes(ctx, exporter),
        *dead_letter_routes.routes(ctx, kafka, consumer.organizations if consumer else None),
        *cluster_routes.routes(ctx, kafka, members or alone(settings.url)),
        *console_routes.routes(),
        *openapi_routes.routes(version()),
    ]
    middleware = [count_responses(responses), methods_checked(routes)]
    if applied is not None and kafka is not None:
        topic, shard = kafka.topic, kafka.shard
        events = EventsApplied(
            lambda: store.committed_offsets(topic), shard.owns, front.acknowledged, authenticate
        )
        middleware.append(read_after(applied, events))
    if sharding is not None:
        middleware.append(shard_routing(authenticate, sharding))
    errors = _errors(kafka).handlers
    return Starlette(routes=routes, exception_handlers=errors, middleware=middleware)
