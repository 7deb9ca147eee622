"""What a core runs with (`CoreSettings`, from the command line), and the defaults of the parts
that take them: the store's writer and its stored keys, how many of each thing one organization
may hold (`TenantLimits`), webhooks, snapshots, reading the dead-letter topic. Each part takes
its default from here.

Plain data importing only the standard library and the other packages' settings
(`ingest.settings`, `meters.settings`): every `meterline` command shows these defaults in its
options without loading DuckDB, the HTTP server or Kafka."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aggregator.errors import LimitReached
from ingest.settings import CoreRouting, IngestSettings

# The longest a write group or background chunk should hold the store's one writer
# (`store.engine.writer`).
JOB_BOUND_SECONDS = 0.25
# Stored external ids held in memory, 16 bytes each (1 GiB), before sorted runs of them spill to
# files (`store.engine.dedupe`).
DEDUPE_MEMORY_KEYS = 64 * 2**20
# Values of one dimension a meter's groups keep per customer and 15-minute bucket; past them,
# values count under `__other__` (`store.metering.groups`, decision 19).
DIMENSION_VALUES = 1_000
# Of the newest records of the dead-letter topic, how many a read looks through at most
# (`intake.dead_letters`).
DEAD_LETTER_SCAN = 5_000


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """How many of each thing one organization may hold: whatever a tenant can multiply costs
    every tenant something, so each has a limit (`store.tables.quotas` checks them)."""

    # Each meter is evaluated for every event of its organization (benchmarks/meter_heavy.py).
    meters: int = 200
    alerts: int = 1000
    webhook_endpoints: int = 25
    streams: int = 20
    # Each active hold is read by every balance check and settled by events naming it.
    holds: int = 10_000
    # Each rule is looked at for every event of its meter that raises a customer's consumption.
    top_up_rules: int = 100


DEFAULTS = TenantLimits()


@dataclass(frozen=True, slots=True)
class Counted:
    """What a limit counts: its words, its `TenantLimits` field, its flag, how to get under."""

    what: str
    field: str
    flag: str
    remedy: str

    def refused(self, limits: TenantLimits) -> LimitReached:
        return LimitReached(self.what, getattr(limits, self.field), self.flag, self.remedy)


METERS = Counted("active meters", "meters", "--max-meters-per-organization", "archive one first")
ALERTS = Counted("alerts", "alerts", "--max-alerts-per-organization", "delete one first")
ENDPOINTS = Counted(
    "webhook endpoints",
    "webhook_endpoints",
    "--max-webhook-endpoints-per-organization",
    "delete one first",
)
STREAMS = Counted(
    "open live streams", "streams", "--max-streams-per-organization", "close one first"
)
HOLDS = Counted(
    "active holds",
    "holds",
    "--max-active-holds-per-organization",
    "release one, or let one settle or expire, first",
)
TOP_UP_RULES = Counted(
    "top-up rules", "top_up_rules", "--max-top-up-rules-per-organization", "delete one first"
)
# Every limit, in the order the command line lists them.
ALL = (METERS, ALERTS, ENDPOINTS, STREAMS, HOLDS, TOP_UP_RULES)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    allow_private: bool = False  # tests, and receivers on the same network, on purpose
    retention_days: float = 30.0
    disable_after_seconds: float = 24 * 3600.0  # failing this long since the last success
    timeout_seconds: float = 10.0  # a whole attempt: connecting, sending, the answer's excerpt
    concurrency: int = 32
    per_endpoint: int = 8
    idle_poll_seconds: float = 5.0
    prune_every_seconds: float = 3600.0
    # At most one customer.state_changed per customer per this many seconds.
    state_changed_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class BackupSettings:
    to: Path
    every_seconds: float = 3600.0
    kept: int = 24


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """The lakehouse export (`aggregator.export`): to a folder or `s3://bucket/prefix`."""

    to: str
    # Which exporter's position the table records: the shard's (its cores share it).
    app_id: str = "meterline/0/1"
    max_events: int = 50_000  # per commit: fewer, larger files
    idle_seconds: float = 1.0
    retry_seconds: float = 5.0
    # How often each customer meter's usage per day is refreshed (its own table).
    usage_every_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    url: str
    token: str
    organization: str = "default"  # whose events go upstream (the token is that org's there)
    rate_per_minute: float = 500.0
    max_events: int = 1000
    max_bytes: int = 9 * 1024 * 1024  # under the upstream's 10 MiB, leaving room for framing
    timeout_seconds: float = 10.0
    idle_seconds: float = 0.5
    max_backoff_seconds: float = 30.0
    mode: Literal["raw", "rollup"] = "raw"
    rollup_minutes: int = 60  # the period of a rollup event (divides a day)
    # Rollup mode: a dimensioned meter's events per value of its dimensions.
    rollup_by_dimension: bool = False
    settle_seconds: float = 60.0  # a period is forwarded this long after it ends
    stage_every_seconds: float = 60.0
    # Local external customer id (or customer id) → the upstream's external_customer_id.
    customer_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CoreSettings:
    data_dir: Path = Path(".meterline")
    # The cluster secret, when not the data dir's secret.key (`auth.cluster_secret`).
    secret_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # What other cores and `GET /v1/cluster/` give as this core's URL (None: host and port).
    advertise_url: str | None = None
    ingest: IngestSettings = field(default_factory=IngestSettings)
    token_cache_seconds: float = 2.0
    # SIGTERM to exit, at most (see serving.server._stop).
    drain_seconds: float = 30.0
    # The longest a write group or background chunk should hold the writer, and a read.
    job_bound_seconds: float = JOB_BOUND_SECONDS
    read_timeout_seconds: float = 30.0
    # The longest applied events wait in memory before they are written to the file: a crash
    # loses none of them (the ingest log, or the offsets stored with them, replays them), and
    # a longer wait writes fewer, fuller row groups.
    flush_seconds: float = 5.0
    # Stored external ids held in memory (16 bytes each) before they spill to files.
    dedupe_memory_keys: int = DEDUPE_MEMORY_KEYS
    # What is stored depends on it: every core of a cluster runs with the same.
    dimension_values: int = DIMENSION_VALUES
    # How long a customer session token lasts (Polar's: an hour).
    customer_session_seconds: float = 3600.0
    # Bearer token that `/metrics` requires (None: served to anyone who can reach the port).
    metrics_token: str | None = None
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    # Seconds without an event before GET /v1/customer-meters/stream sends a heartbeat comment
    # (below the idle timeouts of the proxies in front).
    stream_heartbeat_seconds: float = 15.0
    # How many of what a tenant can multiply one organization may hold.
    quotas: TenantLimits = field(default_factory=TenantLimits)
    # Kafka mode: never lead (`intake.leadership`): apply the leader's journal, with no side
    # effects of its own (cli --replica).
    replica: bool = False
    # Snapshots of the data dir written while serving (`backup`; cli --backup-to).
    backups: BackupSettings | None = None
    export: ExportSettings | None = None
    # An edge: the cores it sends every request but ingest to (cli --core).
    cores: CoreRouting = field(default_factory=CoreRouting)

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

    @property
    def database(self) -> Path:
        return self.data_dir / "meterline.duckdb"
