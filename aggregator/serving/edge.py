"""A stateless ingest edge as `meterline ingest` runs it: tokens from the control topic,
validation, the Kafka publisher, and the way to the cores for every other request. It loads no
store: an edge starts without DuckDB, the API or the core's background work."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop

from aggregator.auth import cluster_secret
from aggregator.intake.sealed import Sealer
from aggregator.intake.token_records import TokenView
from aggregator.serving.listening import PROCESS, Listening
from aggregator.serving.server import serve_http
from aggregator.settings import CoreSettings
from ingest.http import Cores, Front, PerOrganization, edge_app
from ingest.kafka import KafkaSettings
from ingest.publish.kafka_publisher import KafkaPublisher
from ingest.validation import ValidationPool


def run(
    settings: CoreSettings,
    kafka: KafkaSettings,
    log_level: str,
    listening: Listening,
    validation: ValidationPool,
) -> int:
    """`meterline ingest`, until stopped (`serving.command.run` prepares it)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            serve_edge(
                settings, kafka, log_level=log_level, listening=listening, validation=validation
            )
        )
    return 0


async def serve_edge(
    settings: CoreSettings,
    kafka: KafkaSettings,
    *,
    log_level: str,
    listening: Listening = PROCESS,
    validation: ValidationPool | None = None,
) -> None:
    """Run a stateless ingest edge until stopped (`listening`). It reads tokens from the control
    topic (`intake.token_records`), checked with the cluster secret (the data dir's
    `secret.key`, a copy of the core's), and holds nothing else. With cores (`--core`), it
    sends them every other request (`ingest.http.cores`). `validation`: the pool of validation
    workers, started (else one is made)."""
    secret = cluster_secret(settings.data_dir, settings.secret_file, create=False)
    async with contextlib.AsyncExitStack() as stack:
        view = await stack.enter_async_context(
            TokenView(kafka, Sealer(secret), secret, only_tokens=True)
        )
        validation = await stack.enter_async_context(
            validation
            or ValidationPool(settings.ingest.rules, workers=settings.ingest.validation_workers)
        )
        publisher = await stack.enter_async_context(KafkaPublisher(kafka, validation))
        front = Front.of(settings.ingest.limits)
        authenticate = view.organization_id
        cores = None
        if settings.cores.cores:
            cores = await stack.enter_async_context(
                Cores(settings.cores, authenticate, front.acknowledged)
            )
        otlp_of = PerOrganization(settings.ingest.otlp, view.otlp_settings)
        app = edge_app(
            publisher,
            authenticate,
            settings.ingest,
            settings.metrics_token,
            front,
            cores,
            otlp_of,
            view.pricing_of,
        )
        await serve_http(app, settings, log_level, [], listening, gate=front.gate(authenticate))
