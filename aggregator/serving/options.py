"""The options of the processes: `meterline up`, `core` and `ingest` (each option's default is
its setting's: `aggregator.settings`, `ingest.settings`, `meters.settings`). Every `meterline`
command builds these, so this module imports no more than the settings do; what the process
runs with is read from them by `serving.command`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from aggregator.commands.common import (
    command,
    data_dir_option,
    secret_file_option,
    topic_options,
)
from aggregator.settings import ALL as QUOTAS
from aggregator.settings import (
    BackupSettings,
    CoreSettings,
    ExportSettings,
    TenantLimits,
    WebhookSettings,
)
from aggregator.upstream import options as upstream_options
from ingest.settings import (
    MIB,
    CoreRouting,
    IngestSettings,
    KafkaSettings,
    Limits,
    usable_cpus,
)
from meters.settings import COMPRESSIONS


def commands(subparsers: Any) -> None:
    up = command(subparsers, "up", "serve everything in one process (embedded by default)")
    _options(up, kafka_required=False)
    up.add_argument(
        "--dev-token",
        action=argparse.BooleanOptionalAction,
        help="print the development token of organization 'default' once serving, creating it"
        " if needed (default: only when --host is a loopback address)",
    )
    _options(
        command(subparsers, "core", "the DuckDB owner: Kafka consumer and the full API"),
        kafka_required=True,
    )
    _options(
        command(subparsers, "ingest", "a stateless ingest edge publishing to Kafka"),
        kafka_required=True,
        core=False,
    )


def _options(parser: argparse.ArgumentParser, *, kafka_required: bool, core: bool = True) -> None:
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
    secret_file_option(parser)
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
            "--dimension-values",
            type=_at_least_one,
            default=CoreSettings().dimension_values,
            help="values of one dimension a meter keeps per customer and 15-minute bucket;"
            " the rest count under __other__ (every core of a cluster runs with the same)",
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
        export = parser.add_argument_group("lakehouse export (needs the `export` extra)")
        export.add_argument(
            "--export-to",
            metavar="DIR|s3://bucket/prefix",
            help="export every current event, exactly once, to a Delta Lake table there"
            " (<target>/events, partitioned by organization and day), while this core leads;"
            " voided events are deleted from it",
        )
        export.add_argument(
            "--export-max-events",
            type=int,
            default=ExportSettings("").max_events,
            help="events per commit to the exported table at most",
        )
        export.add_argument(
            "--export-usage-every-seconds",
            type=float,
            default=ExportSettings("").usage_every_seconds,
            help="how often each customer meter's usage per day is refreshed in its table"
            " (<target>/customer_meter_usage)",
        )
        _quotas(parser.add_argument_group("per organization (409 LimitReached past each)"))
        upstream_options.arguments(parser.add_argument_group("forwarding upstream"))
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
    for counted in QUOTAS:
        group.add_argument(
            counted.flag,
            type=int,
            dest=f"quota_{counted.field}",
            default=getattr(defaults, counted.field),
            help=f"{counted.what} one organization may hold",
        )


def _at_least_one(text: str) -> int:
    """An option's whole number of at least 1 (argparse says which option otherwise)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value
