"""A core as `meterline up` and `meterline core` run it: the store, fed by ingest directly
(embedded) or by the Kafka consumer, with the API over it, the background work (backfills, plan
cycles, void jobs, webhooks, forwarding, snapshots) and, in Kafka mode, the journal, the lease
and the other cores' heartbeats. A data dir that cannot be opened ends the command with what to
do."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from functools import partial

import duckdb
import httpx
import uvloop

from aggregator import core_metrics
from aggregator.api.shard_routing import Peers, Sharding
from aggregator.auth import TokenRegistry, cluster_secret
from aggregator.background import Backfiller, PlanCycler, Voider
from aggregator.backup import Backups, SnapshotSocket, Taken
from aggregator.commands import tokens as token_commands
from aggregator.commands.common import program
from aggregator.core_app import alert_payload, build_app, state_payload
from aggregator.errors import UsageError
from aggregator.export.exporter import Exporter
from aggregator.intake.consumer import Consumer
from aggregator.intake.control import ControlApplier, ControlTopic
from aggregator.intake.embedded import EmbeddedPublisher
from aggregator.intake.journal import Journal
from aggregator.intake.leadership import Lease, Role
from aggregator.intake.members import Members
from aggregator.intake.routing import Placement
from aggregator.intake.sealed import Sealer
from aggregator.intake.splits import Retiring, Splits
from aggregator.intake.token_records import TokenExporter, TokenView, keep_record
from aggregator.services.live_feed import LiveFeed
from aggregator.serving.data_dir import locked
from aggregator.serving.listening import PROCESS, Listening
from aggregator.serving.server import serve_http
from aggregator.settings import CoreSettings, ForwarderSettings
from aggregator.store import LogCorrupt, Store
from aggregator.upstream.forwarder import Forwarder
from aggregator.upstream.progress import Progress
from aggregator.upstream.webhook_sender import WebhookSender
from ingest.http import Front
from ingest.kafka import KafkaSettings, Shard
from ingest.publish import Publisher
from ingest.publish.kafka_publisher import KafkaPublisher
from ingest.validation import ValidationPool


def run(
    args: argparse.Namespace,
    settings: CoreSettings,
    kafka: KafkaSettings | None,
    forward: ForwarderSettings | None,
    listening: Listening,
    validation: ValidationPool,
) -> int:
    """`meterline up` and `meterline core`, until stopped (`serving.command.run` prepares it)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(
                serve(
                    settings,
                    kafka,
                    forward,
                    log_level=args.log_level,
                    banner=args.command == "up",
                    dev_token=getattr(args, "dev_token", None),
                    listening=listening,
                    validation=validation,
                )
            )
        except duckdb.Error as exc:
            unopenable = _unopenable(settings, exc)
            if unopenable is None:
                raise
            raise UsageError(unopenable) from None
        except LogCorrupt as exc:
            raise UsageError(_damaged(settings, exc)) from None
    return 0


async def serve(
    settings: CoreSettings,
    kafka: KafkaSettings | None,
    forward: ForwarderSettings | None = None,
    *,
    log_level: str = "info",
    banner: bool = True,
    dev_token: bool | None = None,
    listening: Listening = PROCESS,
    validation: ValidationPool | None = None,
) -> None:
    """Run a core until stopped (`listening`): the API over the store, fed by ingest directly
    (embedded) or by the Kafka consumer. Pending writes are drained on exit. The `banner`
    says how to get a token: the development token if `dev_token` (None: on loopback only).
    `validation`: the pool of validation workers, started (else one is made)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # A replica follows a cluster: a secret of its own would be another cluster's.
    secret = cluster_secret(settings.data_dir, settings.secret_file, create=not settings.replica)
    registry = TokenRegistry(
        settings.data_dir, cache_seconds=settings.token_cache_seconds, secret=secret
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Kafka mode: every API write is a record on the control topic, which this core
            # applies (`intake.control`); embedded, the store applies it at once.
            control = exporter = holds_customer = None
            sealer = Sealer(secret)
            if kafka is not None:
                control = await stack.enter_async_context(ControlTopic(kafka, sealer))
                if kafka.shard.count > 1:  # it keeps the ledgers of the customers it holds
                    holds_customer = Placement(kafka.shard, control.partitions).owns
            store = await stack.enter_async_context(
                Store(
                    settings.database,
                    read_timeout_seconds=settings.read_timeout_seconds,
                    job_bound_seconds=settings.job_bound_seconds,
                    dedupe_memory_keys=settings.dedupe_memory_keys,
                    flush_seconds=settings.flush_seconds,
                    dimension_values=settings.dimension_values,
                    alert_payload=alert_payload,
                    commands=control,
                    holds_customer=holds_customer,
                )
            )
            journal = members = applied = retiring = None
            progress = Progress(store, state_payload=state_payload)
            role = Role(leading=kafka is None)  # embedded, a core always leads
            if kafka is not None and control is not None:
                # One order for the control topic and the events topic: the journal's, which
                # opens for appends once both follow it (`start`, below).
                journal = await stack.enter_async_context(Journal(store, kafka, role))
                if not settings.replica:  # a candidate: it leads while it holds the lease
                    await stack.enter_async_context(Lease(kafka, role, journal.claim))
                members = await stack.enter_async_context(
                    Members(kafka, settings.url, partial(_described, settings, role, journal), role)
                )
                keep = partial(keep_record, registry)
                splits = Splits(kafka.shard)
                await splits.load(store)
                applied = await stack.enter_async_context(
                    ControlApplier(
                        store,
                        kafka,
                        control,
                        registry.organization_exists,
                        keep,
                        journal,
                        role,
                        splits,
                    )
                )
                retiring = await stack.enter_async_context(Retiring(store, kafka, sealer, splits))
                # What the leader's forwarder recorded, applied here too (a new leader
                # forwards on from it).
                progress = Progress(store, journal, state_payload=state_payload)
                # Organizations and tokens reach the edges through the control topic.
                view = await stack.enter_async_context(TokenView(kafka, sealer, secret, keep=keep))
                exporter = await stack.enter_async_context(
                    TokenExporter(registry, view, kafka, sealer)
                )
            taken = Taken()  # the snapshots' figures (`/metrics`)
            await stack.enter_async_context(SnapshotSocket(store, settings.data_dir, taken))
            if settings.backups is not None:
                await stack.enter_async_context(
                    Backups(store, settings.data_dir, settings.backups, taken)
                )
            validation = await stack.enter_async_context(validation or _validation(settings))
            backfiller = await stack.enter_async_context(
                Backfiller(store, journal=journal, role=role)
            )
            await stack.enter_async_context(PlanCycler(store, journal=journal, role=role))
            await stack.enter_async_context(Voider(store, journal=journal, role=role))
            await stack.enter_async_context(  # side effects: the leader's alone
                WebhookSender(
                    store,
                    settings.webhooks,
                    role=role,
                    progress=progress,
                )
            )
            consumer = None
            publisher: Publisher = EmbeddedPublisher(store, validation)
            if kafka is not None:
                assert journal is not None
                consumer = await stack.enter_async_context(
                    Consumer(
                        store,
                        kafka,
                        settings.ingest.rules,
                        registry.organization_exists,
                        journal,
                        role,
                        splits,
                    )
                )
                await journal.start()
                publisher = await stack.enter_async_context(KafkaPublisher(kafka, validation))
            export = None
            if settings.export is not None:  # the leader's alone, as forwarding
                export = await stack.enter_async_context(
                    Exporter(store, settings.export, role=role)
                )
            forwarding = None
            if forward is not None:
                forwarded = registry.organization(forward.organization).id
                forwarder = await stack.enter_async_context(
                    Forwarder(store, forwarded, forward, progress=progress, role=role)
                )
                forwarding = (forwarder, forwarded)
            feed = await stack.enter_async_context(
                LiveFeed(store, settings.stream_heartbeat_seconds, limits=settings.quotas)
            )
            front = Front.of(settings.ingest.limits)
            sharding = None
            router = consumer.router if consumer is not None else None
            if router is not None and members is not None and kafka is not None:
                client = await stack.enter_async_context(
                    httpx.AsyncClient(timeout=settings.ingest.deadline_seconds, trust_env=False)
                )
                cores = partial(_shard_cores, members, kafka.shard.count)
                sharding = Sharding(router.owner, Peers(kafka.shard, cores, client))
            app = build_app(
                store,
                registry,
                publisher,
                backfiller,
                settings,
                consumer,
                forwarding,
                feed,
                kafka,
                front,
                exporter.sync if exporter is not None else None,
                members.current if members is not None else None,
                applied,
                sharding,
                [
                    core_metrics.snapshots(taken),
                    *([core_metrics.journal_lag(journal)] if journal is not None else []),
                ],
                export,
            )
            url = f"http://{settings.host}:{settings.port}"
            lines = [f"console: {url}/ (log in with a token); API reference: {url}/docs"]
            if banner:
                lines += token_commands.banner_lines(registry, settings, dev_token, kafka)
            else:
                lines.append(f"a token: {token_commands.create_command(settings, kafka)}")
            if exporter is not None:  # the development token too, before edges are told
                await exporter.sync()
            # Open streams end as shutdown begins: uvicorn would wait for them.
            gate = front.gate(registry.organization_id)
            await serve_http(
                app,
                settings,
                log_level,
                lines,
                listening,
                gate=gate,
                on_stop=feed.close,
                until=retiring.done if retiring is not None else None,
            )
    finally:
        registry.close()


def _validation(settings: CoreSettings) -> ValidationPool:
    return ValidationPool(settings.ingest.rules, workers=settings.ingest.validation_workers)


def _shard_cores(members: Members, count: int, index: int) -> list[str]:
    """The live cores of shard `index` of `count`, leaders first (`api.shard_routing`)."""
    found = [
        m
        for m in members.members()
        if m.alive and not m.this and m.shard == str(Shard(index, count))
    ]
    return [m.url for m in sorted(found, key=lambda m: m.role != "leader")]


def _described(settings: CoreSettings, role: Role, journal: Journal) -> tuple[str, int | None, int]:
    """What this core's heartbeats say of it (`intake.members`)."""
    name = "leader" if role.leading else "replica" if settings.replica else "standby"
    return name, journal.position(), journal.epoch


def _unopenable(settings: CoreSettings, exc: duckdb.Error) -> str | None:
    """One line for a DuckDB file that cannot be opened as it is: held by another process, or
    damaged (its write-ahead log, or the file itself). None: another error."""
    error = str(exc)
    if isinstance(exc, duckdb.IOException) and "lock" in error:
        return _locked(settings, error)
    said = error.splitlines()[0] if error else type(exc).__name__
    wal = f"{settings.database}.wal"
    if "WAL" in error:
        return (
            f"the write-ahead log {wal} of the database is damaged ({said}); restore the data"
            f" dir from a backup, or move {wal} aside to open the database as of its last"
            " checkpoint (losing what was written after it)"
        )
    if "not a valid DuckDB database file" in error:
        return (
            f"{settings.database} is damaged or not a meterline database ({said}); restore the"
            " data dir from a backup, or pass another --data-dir"
        )
    return None


def _locked(settings: CoreSettings, error: str) -> str:
    """One line for a data dir whose DuckDB file another process holds (DuckDB names it)."""
    holder = re.search(r"\(PID (\d+)\)", error)
    return locked(settings, f"process {holder.group(1)}" if holder else "another process")


def _damaged(settings: CoreSettings, error: LogCorrupt) -> str:
    """One line for an ingest log that cannot give back what it acknowledged."""
    check = f"{program()} ingest-log check --data-dir {settings.data_dir}"
    return (
        f"{error}; `{check}` says what is lost, and `ingest-log repair` moves what does not"
        " read back aside (kept, not deleted) so that the server starts without it"
    )
