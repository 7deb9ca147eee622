"""What an edge runs with, and the core's ingest routes with it: the ingest limits (`Limits`,
per token and per organization: `ingest.http.admission`), the way to the cores
(`CoreRouting`: `ingest.http.cores`), OTLP trace exports (`ingest.http.otlp`), the processes
validating bodies (`ingest.validation`), and Kafka (`KafkaSettings`, used through
`ingest.kafka`).

Plain data importing only the standard library and `meters.settings`: every `meterline`
command shows these defaults in its options without loading the HTTP server, Arrow or Kafka's
client (the Kafka settings make the clients, and import aiokafka only then)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meters.settings import Customers, EventRules, Prices

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's refill per second; it holds one second's worth."""

    requests: float
    events: float


@dataclass(frozen=True, slots=True)
class Limits:
    """What one process admits at once, and each token and organization of it
    (`ingest.http.admission`)."""

    # A request's headers must have arrived this long after it began (the socket is closed
    # past it); a keep-alive connection idle this long is closed.
    header_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 5.0
    # A body must have arrived this long after its headers (408 past it).
    body_timeout_seconds: float = 10.0
    # Body bytes held by requests being read, validated or published at once (503 past it).
    max_buffered_bytes: int = 256 * MIB
    # Requests validated or publishing at once (503 past it).
    max_inflight: int = 64
    # What one organization may hold of the two above (429 past it): the rest stays for others.
    # 16 requests: twice what the SDK and the benchmarks keep in flight.
    organization_share: float = 0.25
    # Far above what one client of the project's benchmarks sends (8 × 1,000-event requests
    # in flight), below what a flood of small requests would take from everyone else.
    token_rate: Rate = Rate(requests=2_000, events=1_000_000)
    organization_rate: Rate = Rate(requests=4_000, events=2_000_000)


@dataclass(frozen=True, slots=True)
class CoreRouting:
    """An edge's way to the cores (`ingest.http.cores`, whose protocol's steps are named)."""

    cores: tuple[str, ...] = ()  # base URLs
    hedge_seconds: float = 1.0
    write_attempt_seconds: float = 10.0
    deadline_seconds: float = 30.0
    probe_seconds: float = 1.0
    connections: int = 256  # per core, open at once
    organizations: int = 100_000  # whose last write's offset is kept (step 5)
    max_body_bytes: int = 10 * 1024 * 1024
    body_timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    """Which span attributes name a usage span's customer, and the price table that gives its
    event a cost (none: no cost)."""

    customers: Customers = field(default_factory=Customers)
    prices: Prices | None = None


# The largest ingest body (413 past it).
MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestSettings:
    rules: EventRules = field(default_factory=EventRules)
    max_body_bytes: int = MAX_BODY_BYTES
    # Rates, shares and deadlines that keep tenants from stopping each other.
    limits: Limits = field(default_factory=Limits)
    # Processes validating large bodies (0: validate on the event loop).
    validation_workers: int = 2
    # How long a request may wait for durability before it gets 503 (and should retry).
    deadline_seconds: float = 5.0
    # OTLP trace exports: whose the usage spans are, and what they cost.
    otlp: OtlpSettings = field(default_factory=OtlpSettings)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> int:
    """The CPUs this process may use: those it may run on, capped by its cgroup's CPU limit
    (v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`), rounded up. In a
    container `os.cpu_count()` is the node's: a pod limited to 2 CPUs on a 32-CPU node would
    start 32 validation workers of about 124 MB each. `own`: this process's cgroup v2 path
    (default: from /proc/self/cgroup; in a container, usually `/`)."""
    cpus = len(os.sched_getaffinity(0))
    if own is None:
        lines = _read(Path("/proc/self/cgroup")).splitlines()
        own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    limits = [
        _read(cgroup / own.lstrip("/") / "cpu.max").split(),
        _read(cgroup / "cpu.max").split(),
        [_read(cgroup / "cpu" / "cpu.cfs_quota_us"), _read(cgroup / "cpu" / "cpu.cfs_period_us")],
    ]
    for limit in limits:
        try:
            quota, period = int(limit[0]), int(limit[1])
        except (IndexError, ValueError):  # none here, or "max" / -1: no limit
            continue
        if quota > 0 and period > 0:
            return max(1, min(cpus, math.ceil(quota / period)))
    return max(1, cpus)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class Shard:
    """Which of `count` cores' partition sets a core applies: the events topic's partitions
    p with p % count == index (and the whole control topic). One shard is every partition."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: I/N needs 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N`, as `--shard` takes it."""
        index, slash, count = text.partition("/")
        if not slash or not index.isdigit() or not count.isdigit():
            raise ValueError(f"shard {text!r}: expected I/N, e.g. 0/2")
        return cls(int(index), int(count))

    def owns(self, partition: int) -> bool:
        return partition % self.count == self.index

    def partitions(self, count: int) -> list[int]:
        """This shard's partitions of a topic of `count`."""
        return [p for p in range(count) if self.owns(p)]

    @property
    def suffix(self) -> str:
        """What names this shard's own topics and groups ("" for one shard: the names of
        before shards, so that an upgraded core goes on where it was)."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How every Kafka client of a process reaches the brokers: Kafka's `security.protocol`;
    with TLS, the CA file that signed the brokers' certificates (none: the system's) and this
    process's certificate and key (mutual TLS); with SASL, the mechanism and credentials: a
    username and password, or for OAUTHBEARER a file holding the token, read again at every
    authentication (whatever renews it, such as a Kubernetes projected token, rewrites the
    file). The password is never a command-line argument (`meterline` reads it from the
    environment or a file) and never shown (`repr`)."""

    protocol: str = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    sasl_token_file: str | None = None  # OAUTHBEARER
    # Where the password was read (none: the environment), for commands printed to be pasted.
    sasl_password_file: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security protocol {self.protocol!r}: one of {SECURITY_PROTOCOLS}")
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"SASL mechanism {self.sasl_mechanism!r}: one of {SASL_MECHANISMS}")
        if self.protocol.startswith("SASL"):
            if self.sasl_mechanism == "OAUTHBEARER" and not self.sasl_token_file:
                raise ValueError("SASL OAUTHBEARER needs a token file")
            if self.sasl_mechanism != "OAUTHBEARER" and not (
                self.sasl_username and self.sasl_password
            ):
                raise ValueError(f"{self.protocol} needs a SASL username and password")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if self.cert_file and not self.tls:
            raise ValueError(f"a client certificate is for SSL or SASL_SSL, not {self.protocol}")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def options(self) -> dict[str, Any]:
        """The aiokafka client options saying it (every client is made with them)."""
        found: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            from aiokafka.helpers import create_ssl_context

            found["ssl_context"] = create_ssl_context(
                cafile=self.ca_file, certfile=self.cert_file, keyfile=self.key_file
            )
        if self.protocol.startswith("SASL") and self.sasl_token_file:
            from ingest.kafka_oauth import TokenFile

            found |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_oauth_token_provider": TokenFile(self.sasl_token_file),
            }
        elif self.protocol.startswith("SASL"):
            found |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        return found


@dataclass(slots=True)
class Learned:
    """What a process learns of its brokers as its clients talk to them (`ingest.kafka`): kept
    with the settings that name the brokers, and shared by their copies (`dataclasses.replace`
    passes it on), so that what one client learned the next need not try again. Whether they
    start idempotent producers: None until a producer of these settings tried."""

    idempotent_producers: bool | None = None


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: str
    topic: str = "meterline.events"
    dead_letter_topic: str = "meterline.events.dead"
    partitions: int = 6
    replication_factor: int = 1
    compression: str | None = None  # of Kafka batches: gzip, snappy, lz4 or zstd
    # Of the columnar records, whole (zstd, lz4 or none); see docs/internals/benchmarks.md.
    record_compression: str = "zstd"
    # A columnar record holds at most about this many bytes of uncompressed columns.
    max_record_bytes: int = 1024 * 1024
    # On, retries cannot duplicate records. A broker without idempotent producers (Tansu) is
    # detected (`ingest.kafka.start_producer`): off skips the attempt.
    idempotence: bool = True
    linger_ms: int = 5
    max_batch_bytes: int = 1024 * 1024
    max_request_bytes: int = 8 * 1024 * 1024
    start_timeout_seconds: float = 30.0
    # Stopping a client (flushing, leaving the group), and sending dead letters, at most.
    stop_timeout_seconds: float = 10.0
    send_timeout_seconds: float = 30.0
    consumer_group: str = "meterline-core"
    # How long the cores' group waits for a silent leader (killed, paused or cut off) before
    # another core leads; a killed core restarted sooner waits out the rest of it. 6 s is
    # Kafka's least by default (group.min.session.timeout.ms); at 10 s a standby answered a
    # write 16.2 s after the leader's kill (benchmarks/takeover.py).
    session_timeout_seconds: float = 6.0
    shard: Shard = Shard()
    security: KafkaSecurity = KafkaSecurity()
    learned: Learned = field(default_factory=Learned, compare=False, repr=False)

    @property
    def idempotent(self) -> bool:
        """Whether the producers made now are idempotent: asked for, and not found missing."""
        return self.idempotence and self.learned.idempotent_producers is not False

    @property
    def control_topic(self) -> str:
        """Where every API write is a record (`meters.commands`): one partition, one order."""
        return f"{self.topic}.control"

    @property
    def journal_topic(self) -> str:
        """The order every core of this shard applies the other topics in
        (`aggregator.intake.journal`): each shard has its own."""
        return f"{self.topic}.journal{self.shard.suffix}"

    @property
    def lease_topic(self) -> str:
        """Whose core leads: the group member holding its one partition (each shard's
        group its own leader; `aggregator.intake.leadership`). Its records are every core's
        heartbeats (`aggregator.intake.members`), whatever its shard."""
        return f"{self.topic}.lease"

    @property
    def lease_group(self) -> str:
        """The cores' consumer group over the lease topic. Not the group itself: a broker may
        keep the protocol of a group's past members (Tansu keeps the previous main's
        `roundrobin` for its consumers of the events topic), and refuses another in it."""
        return f"{self.consumer_group}.lease{self.shard.suffix}"

    def reader(self, **overrides: Any) -> AIOKafkaConsumer:
        """A consumer outside any group, whose positions its owner sets (assign and seek)."""
        from aiokafka import AIOKafkaConsumer

        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
        }
        return AIOKafkaConsumer(**(options | self.security.options() | overrides))

    def member(self, group_id: str, **overrides: Any) -> AIOKafkaConsumer:
        """A consumer in `group_id` (its partitions assigned by the group)."""
        from aiokafka import AIOKafkaConsumer

        options = {"bootstrap_servers": self.bootstrap, "group_id": group_id}
        return AIOKafkaConsumer(**(options | self.security.options() | overrides))

    def admin(self) -> AIOKafkaAdminClient:
        from aiokafka.admin import AIOKafkaAdminClient

        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.security.options())

    def producer(self, **overrides: Any) -> AIOKafkaProducer:
        """A producer, not started: `ingest.kafka.start_producer` starts one, learning whether
        the broker has idempotent producers."""
        from aiokafka import AIOKafkaProducer

        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": self.idempotent,
            "compression_type": self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_bytes,
            "max_request_size": self.max_request_bytes,
        }
        return AIOKafkaProducer(**(options | self.security.options() | overrides))
