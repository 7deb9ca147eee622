"""`meterline up`, `core` and `ingest` (`run`), and what they do before their process starts:
the settings read from their options (`settings_of`), the cluster secret checked, the port bound
and a core's data dir taken (`serving.data_dir`), each failure a UsageError saying what to fix;
then the validation workers started, and only then the composition imported (`core`, or `edge`,
which loads no store), so that the workers start while the process imports the second or so of
code it serves with. The process serves once they run (`ingest.validation.ValidationPool`); a
start that fails before it serves leaves the data dir as it found it."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import logging
import socket
from collections.abc import Callable
from datetime import timedelta

import orjson

from aggregator.auth import SECRET_FILE, cluster_secret
from aggregator.commands.common import kafka_of
from aggregator.errors import UsageError
from aggregator.serving.data_dir import Taken, take
from aggregator.serving.listening import Listening
from aggregator.settings import (
    ALL,
    BackupSettings,
    CoreSettings,
    ExportSettings,
    ForwarderSettings,
    TenantLimits,
    WebhookSettings,
)
from aggregator.upstream.customer_map import load_customer_map
from ingest.settings import (
    MIB,
    CoreRouting,
    IngestSettings,
    KafkaSettings,
    Limits,
    OtlpSettings,
    Rate,
    Shard,
)
from meters.settings import CUSTOMERS, Customers, EventRules, Prices

_MAX_REQUEST_BYTES = 10 * 1024 * 1024  # the upstream's (`--upstream-batch-bytes`)


def run(args: argparse.Namespace, serving: Callable[[], None] = lambda: None) -> int:
    """`meterline up`, `core` or `ingest`, until stopped (see the module's docstring); `serving`
    is called once the process serves. A start that fails leaves the data dir as it was."""
    settings, kafka, forward, listening, taken = prepared(args, serving)
    try:
        # Imported here, as each step needs it: the workers start before the composition loads.
        from ingest.validation import ValidationPool

        validation = ValidationPool(
            settings.ingest.rules, workers=settings.ingest.validation_workers
        )
        validation.start()
        try:
            if args.command == "ingest":
                from aggregator.serving import edge

                assert kafka is not None  # --kafka is required
                return edge.run(settings, kafka, args.log_level, listening, validation)
            from aggregator.serving import core

            return core.run(args, settings, kafka, forward, listening, validation)
        finally:
            validation.close()  # stopped already, unless the start failed before it was used
    except BaseException:
        if taken is not None and not taken.served:
            taken.undo()
        for sock in listening.sockets or ():
            sock.close()
        raise


def prepared(
    args: argparse.Namespace, serving: Callable[[], None] = lambda: None
) -> tuple[CoreSettings, KafkaSettings | None, ForwarderSettings | None, Listening, Taken | None]:
    """The settings of `args`, the cluster secret checked, where the process listens (the port
    bound; `serving` called once it serves), and a core's data dir taken (`serving.data_dir`:
    the edge keeps none); logging set to `--log-level`."""
    settings, kafka, forward = settings_of(args)
    secret = settings.data_dir / SECRET_FILE
    if args.command == "ingest" or settings.replica or settings.secret_file or secret.exists():
        # It must exist (an edge or a replica only checks tokens, and a secret of its own
        # would be another cluster's), or it is given: is it one? Else a core makes it.
        cluster_secret(settings.data_dir, settings.secret_file, create=False)
    sock = _bound(settings.host, settings.port)
    try:
        taken = None if args.command == "ingest" else take(settings)
    except BaseException:
        sock.close()
        raise

    def served() -> None:
        if taken is not None:
            taken.served = True
        serving()

    logging.getLogger().setLevel(args.log_level.upper())
    return settings, kafka, forward, Listening(sockets=[sock], started=served), taken


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
        dimension_values=getattr(args, "dimension_values", defaults.dimension_values),
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
                for field in (counted.field for counted in ALL)
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
        kafka = kafka_of(
            args,
            dead_letter_topic=args.dead_letter_topic,
            partitions=args.partitions,
            replication_factor=args.replication_factor,
            compression=args.compression,
            record_compression=args.record_compression,
            linger_ms=args.linger_ms,
            consumer_group=args.consumer_group,
            session_timeout_seconds=args.consumer_session_timeout_seconds,
            shard=shard,
        )
    if getattr(args, "export_to", None):
        if importlib.util.find_spec("deltalake") is None:
            raise UsageError(
                "--export-to writes a Delta Lake table: install the export extra"
                " (pip install 'meterline[export]')"
            )
        export = ExportSettings(
            args.export_to,
            f"meterline/{shard}",
            args.export_max_events,
            usage_every_seconds=args.export_usage_every_seconds,
        )
        settings = dataclasses.replace(settings, export=export)
    forward = forwarder_settings(args)
    if settings.replica and forward is not None:
        raise UsageError("a --replica forwards nothing: forward from the core it follows")
    return settings, kafka, forward


def forwarder_settings(args: argparse.Namespace) -> ForwarderSettings | None:
    if not getattr(args, "upstream_url", None):
        return None
    if not args.upstream_token:
        raise UsageError("--upstream-url needs --upstream-token (or METERLINE_UPSTREAM_TOKEN)")
    if not 0 < args.upstream_batch_bytes <= _MAX_REQUEST_BYTES:
        raise UsageError("--upstream-batch-bytes must be between 1 and 10 MiB")
    if args.upstream_rate <= 0 or args.upstream_batch_events < 1:
        raise UsageError("--upstream-rate and --upstream-batch-events must be positive")
    return ForwarderSettings(
        args.upstream_url,
        args.upstream_token,
        organization=args.upstream_org,
        rate_per_minute=args.upstream_rate,
        max_events=args.upstream_batch_events,
        max_bytes=args.upstream_batch_bytes,
        timeout_seconds=args.upstream_timeout,
        mode=args.upstream_mode,
        rollup_minutes=args.upstream_rollup_minutes,
        rollup_by_dimension=args.upstream_rollup_by_dimension,
        settle_seconds=args.upstream_settle_seconds,
        stage_every_seconds=args.upstream_stage_seconds,
        customer_map=load_customer_map(args.upstream_customer_map),
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
