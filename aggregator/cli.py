"""The `meterline` command: composes processes from settings given on the command line.

meterline up [--host 127.0.0.1] [--port 8000] [--data-dir ./.meterline] [--kafka BOOTSTRAP]
meterline core --kafka BOOTSTRAP [--port 8000] [--data-dir ./.meterline]
meterline ingest --kafka BOOTSTRAP [--port 8001] [--data-dir ./.meterline]
meterline token create|list|revoke [--data-dir DIR] ...
meterline org list|show NAME [--data-dir DIR]
meterline ingest-log check|repair [--data-dir DIR]
meterline schema record
meterline meters wait [METER_ID ...]
meterline reconcile --from T1 --to T2 --upstream-url URL [--repair] [--mode raw|rollup]
meterline forwarder status|quarantine|resend SEQ

Exit status: 0 done, 1 the work found a problem (drift, a failed meter), 2 could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import duckdb
import httpx
import orjson
import uvicorn
import uvloop
from starlette.applications import Starlette

from aggregator.api.shard_routing import Peers, Sharding
from aggregator.auth import TokenRegistry, cluster_secret
from aggregator.backfill import Backfiller
from aggregator.backup import Backups, BackupSettings, SnapshotSocket
from aggregator.commands import backups as backup_commands
from aggregator.commands import dead_letters as dead_letter_commands
from aggregator.commands import ingest_log as ingest_log_commands
from aggregator.commands import meters as meter_commands
from aggregator.commands import orgs as org_commands
from aggregator.commands import schema as schema_commands
from aggregator.commands import shards as shard_commands
from aggregator.commands import tokens as token_commands
from aggregator.commands.common import (
    HelpFormatter,
    command,
    data_dir_option,
    program,
    security_of,
    topic_options,
    version,
)
from aggregator.core_app import CoreSettings, alert_payload, build_app, state_payload
from aggregator.errors import UsageError
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
from aggregator.plan_cycler import PlanCycler
from aggregator.services.live_feed import LiveFeed
from aggregator.store import LogCorrupt, Store, TenantLimits, quotas
from aggregator.upstream import command_line as upstream_cli
from aggregator.upstream.forwarder import Forwarder, ForwarderSettings
from aggregator.upstream.progress import Progress
from aggregator.upstream.webhook_sender import WebhookSender, WebhookSettings
from ingest.http import (
    MIB,
    CoreRouting,
    Cores,
    Front,
    Gate,
    IngestSettings,
    Limits,
    OtlpSettings,
    PerOrganization,
    Rate,
    edge_app,
    http_protocol,
)
from ingest.kafka import KafkaSettings, Shard
from ingest.publish import Publisher
from ingest.publish.kafka_publisher import KafkaPublisher
from ingest.validation import ValidationPool, usable_cpus
from meters.columnar import COMPRESSIONS
from meters.events import EventRules
from meters.events.genai import CUSTOMERS, Customers, Prices


def _serving(parser: argparse.ArgumentParser, *, kafka_required: bool, core: bool = True) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    if core:
        parser.add_argument(
            "--advertise-url",
            help="this core's URL as the other cores and GET /v1/cluster/ give it (default:"
            " http://HOST:PORT)",
        )
    data_dir_option(parser)
    parser.add_argument(
        "--secret-file",
        type=Path,
        default=os.environ.get("METERLINE_SECRET_FILE") or None,
        help="the cluster secret that tokens are hashed and records sealed with (default:"
        " $METERLINE_SECRET_FILE, else the data dir's secret.key); every core and edge of a"
        " cluster needs the same",
    )
    parser.add_argument(
        "--max-future-seconds",
        type=float,
        default=300,
        help="how far in the future an event timestamp may be (client clock skew)",
    )
    parser.add_argument(
        "--validation-workers",
        type=int,
        default=usable_cpus(),
        help="processes validating large ingest bodies (0: validate in the server process;"
        " default: one per CPU this process may use, as its cgroup's CPU limit allows)",
    )
    parser.add_argument(
        "--otlp-customer-attribute",
        action="append",
        default=[],
        metavar="NAME",
        help="a span attribute that names the customer's external id in OTLP trace exports"
        " (POST /v1/traces), such as enduser.id; repeat for more, tried in order after"
        " meterline.customer.external_id and meterline.customer.id",
    )
    parser.add_argument(
        "--otlp-prices",
        type=Path,
        metavar="FILE",
        help="a price table (JSON: version, currency, models with input and output prices in"
        " cents per token, and cached_input, cache_creation) that gives the events of OTLP"
        " trace exports a _cost (default: none, no cost)",
    )
    parser.add_argument(
        "--deadline-seconds",
        type=float,
        default=IngestSettings().deadline_seconds,
        help="longest wait for durability before an ingest request gets 503",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=CoreSettings().drain_seconds,
        help="after SIGTERM/SIGINT, the longest the process takes to exit: open requests get"
        " half of it, then pending writes; past it the process exits at once",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="least severe log messages shown",
    )
    parser.add_argument(
        "--metrics-token",
        default=os.environ.get("METERLINE_METRICS_TOKEN"),
        help="bearer token that GET /metrics requires (default: $METERLINE_METRICS_TOKEN;"
        " unset: /metrics is open to whoever reaches the port)",
    )
    _limits(parser.add_argument_group("limits (per process)"))
    if core:
        store = parser.add_argument_group("store")
        store.add_argument(
            "--writer-job-bound-seconds",
            type=float,
            default=CoreSettings().job_bound_seconds,
            help="longest a write group or background chunk should hold the DuckDB writer",
        )
        store.add_argument(
            "--query-timeout-seconds",
            type=float,
            default=CoreSettings().read_timeout_seconds,
            help="reads running longer are interrupted and answer 503",
        )
        store.add_argument(
            "--flush-seconds",
            type=float,
            default=CoreSettings().flush_seconds,
            help="longest applied events wait in memory before they are written to the file"
            " (a crash loses none: they are applied again from the log)",
        )
        store.add_argument(
            "--dedupe-memory-keys",
            type=int,
            default=CoreSettings().dedupe_memory_keys,
            help="stored external ids held in memory (16 bytes each); beyond, sorted runs of"
            " them are searched memory-mapped from files beside the database",
        )
        parser.add_argument(
            "--customer-session-seconds",
            type=float,
            default=CoreSettings().customer_session_seconds,
            help="how long a customer session token (POST /v1/customer-sessions/) reads the"
            " customer portal",
        )
        parser.add_argument(
            "--stream-heartbeat-seconds",
            type=float,
            default=CoreSettings().stream_heartbeat_seconds,
            help="seconds without an event before GET /v1/customer-meters/stream sends a"
            " heartbeat (keep it below the idle timeouts of proxies in front)",
        )
        backups = parser.add_argument_group("snapshots (restore one with `meterline restore`)")
        backups.add_argument(
            "--backup-to",
            type=Path,
            metavar="DIR",
            help="write a snapshot of the data dir into DIR while serving, every"
            " --backup-every-seconds (it holds the data dir's secret.key, if any: keep DIR as"
            " private as the data dir)",
        )
        backups.add_argument(
            "--backup-every-seconds",
            type=float,
            default=BackupSettings(Path()).every_seconds,
            help="seconds between two snapshots",
        )
        backups.add_argument(
            "--backups-kept",
            type=int,
            default=BackupSettings(Path()).kept,
            help="snapshots kept (the newest)",
        )
        _quotas(parser.add_argument_group("per organization (409 LimitReached past each)"))
        upstream_cli.arguments(parser.add_argument_group("forwarding upstream"))
        hooks = parser.add_argument_group("webhooks")
        defaults_hooks = WebhookSettings()
        hooks.add_argument(
            "--allow-private-webhooks",
            action="store_true",
            help="let webhook endpoints be private or loopback addresses (refused otherwise)",
        )
        hooks.add_argument(
            "--webhook-retention-days",
            type=float,
            default=defaults_hooks.retention_days,
            help="how long delivered webhook events and delivery logs are kept",
        )
        hooks.add_argument(
            "--state-changed-seconds",
            type=float,
            default=defaults_hooks.state_changed_seconds,
            help="at most one customer.state_changed per customer per this many seconds",
        )
        hooks.add_argument(
            "--webhook-disable-after-seconds",
            type=float,
            default=defaults_hooks.disable_after_seconds,
            help="an endpoint whose deliveries all fail for this long is disabled",
        )
    else:
        _core_routing(parser.add_argument_group("the rest of the API, sent to the cores"))
    kafka = parser.add_argument_group("Kafka")
    kafka.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        required=kafka_required,
        help="bootstrap servers (host:port[,host:port]); without it, the embedded store",
    )
    defaults = KafkaSettings("")
    topic_options(kafka)
    kafka.add_argument(
        "--partitions", type=int, default=defaults.partitions, help="partitions of a new topic"
    )
    kafka.add_argument(
        "--replication-factor",
        type=int,
        default=defaults.replication_factor,
        help="replicas of a new topic",
    )
    kafka.add_argument(
        "--compression",
        choices=["gzip", "snappy", "lz4", "zstd"],
        help="compression of Kafka record batches (default: none)",
    )
    kafka.add_argument(
        "--record-compression",
        choices=list(COMPRESSIONS),
        default=defaults.record_compression,
        help="compression of the edges' columnar records (whole value)",
    )
    kafka.add_argument(
        "--linger-ms",
        type=int,
        default=defaults.linger_ms,
        help="how long the producer waits to fill a batch",
    )
    kafka.add_argument(
        "--consumer-group", default=defaults.consumer_group, help="the core's consumer group"
    )
    kafka.add_argument(
        "--consumer-session-timeout-seconds",
        type=float,
        default=defaults.session_timeout_seconds,
        help="how long the core's group waits for a silent leader before another core takes"
        " over (a killed core restarted sooner waits out the rest)",
    )
    if core:
        kafka.add_argument(
            "--shard",
            metavar="I/N",
            default=str(defaults.shard),
            help="apply the events topic's partitions p with p %% N == I (with the whole control"
            " topic), as one of N shards, each with its own leader, standbys and replicas; at"
            " most as many shards as the topic has partitions (docs: replicas and shards)",
        )
        kafka.add_argument(
            "--replica",
            action="store_true",
            help="never lead: apply what the leader journals, and serve every read and write;"
            " read no partition, deliver no webhook, forward nothing, run no plan cycle (needs"
            " --kafka and its own --data-dir). Without it, a core leads, or stands by to take"
            " over from the one that does",
        )


def _limits(group: argparse._ArgumentGroup) -> None:
    limits = Limits()
    for option, default, meaning in (
        ("--header-timeout-seconds", limits.header_timeout_seconds, "request headers to arrive"),
        ("--idle-timeout-seconds", limits.idle_timeout_seconds, "an idle keep-alive connection"),
        ("--body-timeout-seconds", limits.body_timeout_seconds, "a request body to arrive (408)"),
    ):
        group.add_argument(option, type=float, default=default, help=f"longest wait for {meaning}")
    group.add_argument(
        "--max-buffered-mib",
        type=float,
        default=limits.max_buffered_bytes / MIB,
        help="ingest body bytes held at once (503 past it)",
    )
    group.add_argument(
        "--max-inflight",
        type=int,
        default=limits.max_inflight,
        help="ingest requests validated or publishing at once (503 past it)",
    )
    group.add_argument(
        "--organization-share",
        type=float,
        default=limits.organization_share,
        help="fraction of the two above one organization may hold (429 past it)",
    )
    for who, rate in (("token", limits.token_rate), ("organization", limits.organization_rate)):
        group.add_argument(
            f"--{who}-requests-per-second",
            type=float,
            default=rate.requests,
            help=f"ingest requests per second per {who} (429 past it)",
        )
        group.add_argument(
            f"--{who}-events-per-second",
            type=float,
            default=rate.events,
            help=f"ingested events per second per {who} (429 past it)",
        )


def _limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        header_timeout_seconds=args.header_timeout_seconds,
        idle_timeout_seconds=args.idle_timeout_seconds,
        body_timeout_seconds=args.body_timeout_seconds,
        max_buffered_bytes=int(args.max_buffered_mib * MIB),
        max_inflight=args.max_inflight,
        organization_share=args.organization_share,
        token_rate=Rate(args.token_requests_per_second, args.token_events_per_second),
        organization_rate=Rate(
            args.organization_requests_per_second, args.organization_events_per_second
        ),
    )


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a server listens and what stops it. A process listens on `--host`/`--port` and
    stops on SIGINT/SIGTERM (`PROCESS`); a program that runs meterline inside itself (the
    tests, in a thread) hands it bound sockets and an event to set, as signals are not its."""

    sockets: list[socket.socket] | None = None
    stop: asyncio.Event | None = None


PROCESS = Listening()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterline",
        description=__doc__.split("\n")[0],
        epilog="Exit status: 0 done, 1 the work found a problem, 2 could not run.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meterline {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    up = command(commands, "up", "serve everything in one process (embedded by default)")
    _serving(up, kafka_required=False)
    up.add_argument(
        "--dev-token",
        action=argparse.BooleanOptionalAction,
        help="print the development token of organization 'default' once serving, creating it"
        " if needed (default: only when --host is a loopback address)",
    )
    _serving(
        command(commands, "core", "the DuckDB owner: Kafka consumer and the full API"),
        kafka_required=True,
    )
    _serving(
        command(commands, "ingest", "a stateless ingest edge publishing to Kafka"),
        kafka_required=True,
        core=False,
    )
    token_commands.commands(commands)
    meter_commands.commands(commands)
    org_commands.commands(commands)
    schema_commands.commands(commands)
    upstream_cli.commands(commands)
    dead_letter_commands.commands(commands)
    ingest_log_commands.commands(commands)
    backup_commands.commands(commands)
    shard_commands.commands(commands)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `main` reads it (argparse exits 2 on a bad one)."""
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "token":
            return token_commands.run(args)
        if args.command == "meters":
            return meter_commands.run(args)
        if args.command == "org":
            return org_commands.run(args)
        if args.command == "schema":
            return schema_commands.run(args)
        if args.command in ("reconcile", "forwarder"):
            return upstream_cli.run(args)
        if args.command == "dead-letters":
            return dead_letter_commands.run(args)
        if args.command == "ingest-log":
            return ingest_log_commands.run(args)
        if args.command in ("backup", "restore"):
            return backup_commands.run(args)
        if args.command == "split":
            return shard_commands.run(args)
        return _serve_command(args)
    except UsageError as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return 2


def _core_routing(group: argparse._ArgumentGroup) -> None:
    defaults = CoreRouting()
    group.add_argument(
        "--core",
        dest="cores",
        action="append",
        default=[],
        metavar="URL",
        help="a core to send every request but ingest to (repeat for each core; none: the edge"
        " answers them 404)",
    )
    group.add_argument(
        "--core-hedge-seconds",
        type=float,
        default=defaults.hedge_seconds,
        help="a read unanswered this long is sent to the next core too",
    )
    group.add_argument(
        "--core-write-attempt-seconds",
        type=float,
        default=defaults.write_attempt_seconds,
        help="a write unanswered this long is sent to the next core, with its Idempotency-Key",
    )
    group.add_argument(
        "--core-deadline-seconds",
        type=float,
        default=defaults.deadline_seconds,
        help="a request no core answered within this long gets 504 CoreUnavailable",
    )


def _quotas(group: argparse._ArgumentGroup) -> None:
    defaults = TenantLimits()
    for counted in quotas.ALL:
        group.add_argument(
            counted.flag,
            type=int,
            dest=f"quota_{counted.field}",
            default=getattr(defaults, counted.field),
            help=f"{counted.what} one organization may hold",
        )


def settings_of(
    args: argparse.Namespace,
) -> tuple[CoreSettings, KafkaSettings | None, ForwarderSettings | None]:
    """What `up`, `core` and `ingest` run with, from their parsed arguments."""
    defaults = CoreSettings()
    settings = CoreSettings(
        data_dir=args.data_dir,
        secret_file=args.secret_file,
        host=args.host,
        port=args.port,
        drain_seconds=args.drain_seconds,
        metrics_token=args.metrics_token or None,
        # Store settings: the ingest edge has no store, nor these options.
        job_bound_seconds=getattr(args, "writer_job_bound_seconds", defaults.job_bound_seconds),
        read_timeout_seconds=getattr(args, "query_timeout_seconds", defaults.read_timeout_seconds),
        dedupe_memory_keys=getattr(args, "dedupe_memory_keys", defaults.dedupe_memory_keys),
        flush_seconds=getattr(args, "flush_seconds", defaults.flush_seconds),
        customer_session_seconds=getattr(
            args, "customer_session_seconds", defaults.customer_session_seconds
        ),
        stream_heartbeat_seconds=getattr(
            args, "stream_heartbeat_seconds", defaults.stream_heartbeat_seconds
        ),
        replica=getattr(args, "replica", False),
        advertise_url=getattr(args, "advertise_url", None),
        cores=CoreRouting(
            tuple(url.rstrip("/") for url in getattr(args, "cores", ())),
            getattr(args, "core_hedge_seconds", defaults.cores.hedge_seconds),
            getattr(args, "core_write_attempt_seconds", defaults.cores.write_attempt_seconds),
            getattr(args, "core_deadline_seconds", defaults.cores.deadline_seconds),
            max_body_bytes=defaults.ingest.max_body_bytes,
            body_timeout_seconds=_limits_of(args).body_timeout_seconds,
        ),
        backups=None
        if getattr(args, "backup_to", None) is None
        else BackupSettings(args.backup_to, args.backup_every_seconds, args.backups_kept),
        quotas=TenantLimits(
            **{
                field: getattr(args, f"quota_{field}", getattr(defaults.quotas, field))
                for field in (counted.field for counted in quotas.ALL)
            }
        ),
        webhooks=WebhookSettings(
            allow_private=getattr(args, "allow_private_webhooks", False),
            retention_days=getattr(
                args, "webhook_retention_days", defaults.webhooks.retention_days
            ),
            disable_after_seconds=getattr(
                args, "webhook_disable_after_seconds", defaults.webhooks.disable_after_seconds
            ),
            state_changed_seconds=getattr(
                args, "state_changed_seconds", defaults.webhooks.state_changed_seconds
            ),
        ),
        ingest=IngestSettings(
            rules=EventRules(max_future=timedelta(seconds=args.max_future_seconds)),
            validation_workers=args.validation_workers,
            deadline_seconds=args.deadline_seconds,
            limits=_limits_of(args),
            otlp=_otlp_of(args),
        ),
    )
    if getattr(args, "replica", False) and not args.kafka:
        raise UsageError("--replica follows another core's journal: it needs --kafka")
    kafka = None
    try:
        shard = Shard.parse(getattr(args, "shard", "0/1"))
    except ValueError as exc:
        raise UsageError(f"--shard: {exc}") from None
    if shard.count > 1 and not args.kafka:
        raise UsageError("--shard splits the events topic's partitions: it needs --kafka")
    if args.kafka:
        kafka = KafkaSettings(
            args.kafka,
            topic=args.topic,
            dead_letter_topic=args.dead_letter_topic,
            partitions=args.partitions,
            replication_factor=args.replication_factor,
            compression=args.compression,
            record_compression=args.record_compression,
            idempotence=not args.no_idempotence,
            linger_ms=args.linger_ms,
            consumer_group=args.consumer_group,
            session_timeout_seconds=args.consumer_session_timeout_seconds,
            shard=shard,
            security=security_of(args),
        )
    forward = upstream_cli.forwarder_settings(args)
    if settings.replica and forward is not None:
        raise UsageError("a --replica forwards nothing: forward from the core it follows")
    return settings, kafka, forward


def _serve_command(args: argparse.Namespace) -> int:
    settings, kafka, forward = settings_of(args)
    listening = Listening(sockets=[_bound(settings.host, settings.port)])
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the data dir {settings.data_dir} ({exc.strerror}): pass a writable"
            " --data-dir (or METERLINE_DATA_DIR)"
        ) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.command == "ingest":
            assert kafka is not None
            runner.run(serve_edge(settings, kafka, log_level=args.log_level, listening=listening))
            return 0
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


def _otlp_of(args: argparse.Namespace) -> OtlpSettings:
    """What OTLP trace exports need: the customer attributes in order, and the price table."""
    customers = CUSTOMERS | dict.fromkeys(args.otlp_customer_attribute, "external_customer_id")
    prices = None
    if args.otlp_prices is not None:
        try:
            prices = Prices.parse(orjson.loads(args.otlp_prices.read_bytes()))
        except (OSError, orjson.JSONDecodeError, ValueError) as exc:
            raise UsageError(f"--otlp-prices {args.otlp_prices}: {exc}") from None
    return OtlpSettings(Customers(customers), prices)


def _bound(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else is made: a port in use ends the
    command (exit 2) before a data dir is created or opened."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is in use (another meterline?): pass another with"
                f" --port, or `make up PORT={port + 1}`"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


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
    who = f"process {holder.group(1)}" if holder else "another process"
    return (
        f"the data dir {settings.data_dir} is in use: {who} holds {settings.database}"
        " (another meterline on it?); stop that process, or pass another --data-dir"
    )


def _damaged(settings: CoreSettings, error: LogCorrupt) -> str:
    """One line for an ingest log that cannot give back what it acknowledged."""
    check = f"{program()} ingest-log check --data-dir {settings.data_dir}"
    return (
        f"{error}; `{check}` says what is lost, and `ingest-log repair` moves what does not"
        " read back aside (kept, not deleted) so that the server starts without it"
    )


async def serve(
    settings: CoreSettings,
    kafka: KafkaSettings | None,
    forward: ForwarderSettings | None = None,
    *,
    log_level: str = "info",
    banner: bool = True,
    dev_token: bool | None = None,
    listening: Listening = PROCESS,
) -> None:
    """Run a core until stopped (`listening`): the API over the store, fed by ingest directly
    (embedded) or by the Kafka consumer. Pending writes are drained on exit. The `banner`
    says how to get a token: the development token if `dev_token` (None: on loopback only)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    secret = cluster_secret(settings.data_dir, settings.secret_file, create=True)
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
                view = await stack.enter_async_context(TokenView(kafka, sealer, secret))
                exporter = await stack.enter_async_context(
                    TokenExporter(registry, view, kafka, sealer)
                )
            await stack.enter_async_context(SnapshotSocket(store, settings.data_dir))
            if settings.backups is not None:
                await stack.enter_async_context(Backups(store, settings.data_dir, settings.backups))
            validation = await stack.enter_async_context(
                ValidationPool(settings.ingest.rules, workers=settings.ingest.validation_workers)
            )
            backfiller = await stack.enter_async_context(
                Backfiller(store, journal=journal, role=role)
            )
            await stack.enter_async_context(PlanCycler(store, journal=journal, role=role))
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
            await _serve_http(
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


async def serve_edge(
    settings: CoreSettings,
    kafka: KafkaSettings,
    *,
    log_level: str,
    listening: Listening = PROCESS,
) -> None:
    """Run a stateless ingest edge until stopped (`listening`). It reads tokens from the control
    topic (`intake.token_records`), checked with the cluster secret (the data dir's
    `secret.key`, a copy of the core's), and holds nothing else. With cores (`--core`), it
    sends them every other request (`ingest.http.cores`)."""
    secret = cluster_secret(settings.data_dir, settings.secret_file, create=False)
    async with contextlib.AsyncExitStack() as stack:
        view = await stack.enter_async_context(TokenView(kafka, Sealer(secret), secret))
        validation = await stack.enter_async_context(
            ValidationPool(settings.ingest.rules, workers=settings.ingest.validation_workers)
        )
        publisher = await stack.enter_async_context(KafkaPublisher(kafka, validation))
        front = Front.of(settings.ingest.limits)
        authenticate = view.organization_id
        cores = None
        if settings.cores.cores:
            cores = await stack.enter_async_context(Cores(settings.cores, authenticate))
        otlp_of = PerOrganization(settings.ingest.otlp, view.otlp_settings)
        app = edge_app(
            publisher, authenticate, settings.ingest, settings.metrics_token, front, cores, otlp_of
        )
        await _serve_http(app, settings, log_level, [], listening, gate=front.gate(authenticate))


async def _serve_http(
    app: Starlette,
    settings: CoreSettings,
    log_level: str,
    banner: list[str],
    listening: Listening,
    *,
    gate: Gate | None = None,
    on_stop: Callable[[], None] = lambda: None,
    until: asyncio.Event | None = None,
) -> None:
    """Serve until stopped, or `until` is set (which calls `on_stop` first); once serving,
    print where, then the `banner` lines."""
    limits = settings.ingest.limits
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        http=http_protocol(limits.header_timeout_seconds, gate),
        timeout_keep_alive=max(1, round(limits.idle_timeout_seconds)),
        # Half the drain time for open requests; the rest for the store to close.
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds / 2)),
    )
    server = _Server(config)
    if listening.stop is None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, _stop, server, signum, settings.drain_seconds, on_stop)
    else:
        stopping = asyncio.create_task(_stop_on(listening.stop, server, on_stop))
    printing = asyncio.create_task(_banner(server, settings, banner))
    ending = None if until is None else asyncio.create_task(_stop_on(until, server, on_stop))
    await server.serve(sockets=listening.sockets)
    printing.cancel()
    if ending is not None:
        ending.cancel()
    if listening.stop is not None:
        stopping.cancel()


async def _stop_on(
    event: asyncio.Event, server: uvicorn.Server, on_stop: Callable[[], None]
) -> None:
    """A graceful shutdown once `event` is set (no watchdog: the process is not ours to end)."""
    await event.wait()
    on_stop()
    server.should_exit = True


def _stop(
    server: uvicorn.Server, signum: int, drain_seconds: float, on_stop: Callable[[], None]
) -> None:
    """Begin a graceful shutdown, and make sure the process is gone `drain_seconds` later
    whatever is still running: nothing acknowledged is lost by exiting (every 2xx followed a
    commit or a Kafka ack), and a job cut short was never acknowledged."""
    on_stop()
    if not server.should_exit:
        watchdog = threading.Timer(drain_seconds, _exit_now, args=(drain_seconds,))
        watchdog.daemon = True
        watchdog.start()
    server.handle_exit(signum, None)


def _exit_now(drain_seconds: float) -> None:
    logging.getLogger(__name__).error(
        "still draining after %.1f s (--drain-seconds); exiting with work unfinished"
        " (none of it was acknowledged)",
        drain_seconds,
    )
    logging.shutdown()
    os._exit(1)


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM once it has shut down, which would end the process
    before the store drains and closes; `serve` installs handlers of its own instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _banner(server: uvicorn.Server, settings: CoreSettings, lines: list[str]) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.05)
    url = f"http://{settings.host}:{settings.port}"
    print(
        "\n".join([f"meterline is serving {url} (data in {settings.data_dir})", *lines]), flush=True
    )


if __name__ == "__main__":
    raise SystemExit(main())
