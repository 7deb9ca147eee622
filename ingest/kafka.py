"""The one Kafka module: settings, the topics (created if missing), waiting for a broker, and
stopping clients within a bound. The edge's publisher, the SDK's producer and the core's
consumer all take them from here. (Which partition a record goes to is `meters.columnar`'s.)

aiokafka is imported where a client is made: every `meterline` command reads these settings (its
options show their defaults), and most of them never make a client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

log = logging.getLogger(__name__)


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
    # Off only for brokers without it (the test broker); on, retries cannot duplicate records.
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
        from aiokafka import AIOKafkaProducer

        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": self.idempotence,
            "compression_type": self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_bytes,
            "max_request_size": self.max_request_bytes,
        }
        return AIOKafkaProducer(**(options | self.security.options() | overrides))


async def ensure_topics(settings: KafkaSettings) -> int:
    """Create the event, dead-letter, control, journal and lease topics if missing; verify their
    partition counts. Topics made by earlier versions gain the ones they lack. Returns the
    events topic's partition count (the topic's, whatever the settings say)."""
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = settings.admin()
    partitions = {
        settings.topic: settings.partitions,
        settings.dead_letter_topic: settings.partitions,
        settings.control_topic: 1,
        settings.journal_topic: 1,
        settings.lease_topic: 1,
    }
    wanted = list(partitions)
    try:
        async with asyncio.timeout(settings.start_timeout_seconds):
            await retrying(admin.start)
            for name, count in partitions.items():  # apart: one that exists fails no other
                try:
                    await admin.create_topics([NewTopic(name, count, settings.replication_factor)])
                except TopicAlreadyExistsError:
                    pass
            described = await admin.describe_topics(wanted)
    finally:
        await stop_within(admin.close, settings.stop_timeout_seconds, "admin client")
    [count] = [len(d.get("partitions", [])) for d in described if d["topic"] == settings.topic]
    if count != settings.partitions:
        log.warning(
            "topic %s has %d partitions, not the configured %d; using it as it is",
            settings.topic,
            count,
            settings.partitions,
        )
    return count


async def retrying(start: Any) -> None:
    """Call `start` until the broker answers (the caller bounds the wait)."""
    from aiokafka.errors import KafkaError

    while True:
        try:
            await start()
            return
        except KafkaError as exc:
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(0.5)


async def stop_within(stop: Callable[[], Awaitable[Any]], seconds: float, what: str) -> None:
    """`stop()`, no longer waited for (and logged) if it takes longer than `seconds` or fails: a
    client that cannot leave cleanly must not hold up its owner. Past the bound it is left to
    finish in the background rather than cancelled: aiokafka marks a client closed as its stop
    begins, so a stop cut short would leave its tasks and connections behind for good."""
    stopping = asyncio.ensure_future(stop())
    try:
        async with asyncio.timeout(seconds):
            await asyncio.shield(stopping)
    except TimeoutError:
        log.error(
            "stopping the Kafka %s took over %.1f s; left to finish on its own", what, seconds
        )
    except Exception:
        log.exception("stopping the Kafka %s failed; abandoned", what)
