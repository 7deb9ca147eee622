"""The Kafka publisher: validated events as records (`meters.records`), acknowledged by all
in-sync replicas before the request is answered.

Validation workers encode each event's key, value and partition hash (`encode_records`), so the
event loop only frames records into per-partition batches (aiokafka's batch API) and waits for
their acknowledgements. Every wait is bounded by the ingest deadline (the route's timeout): a
broker that is down or slow yields 503, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import pyarrow as pa
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.errors import Unavailable
from ingest.ipc import read_ipc, write_ipc
from ingest.publish import PublishResult
from ingest.validation import ValidationPool
from meters.events import Event
from meters.records import record_key, record_value

log = logging.getLogger(__name__)
_BINARY: pa.DataType = pa.binary()
_STRING: pa.DataType = pa.string()
_FRAMES = pa.schema([("key", _BINARY), ("value", _BINARY), ("external_id", _STRING)])


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: str
    topic: str = "meterline.events"
    dead_letter_topic: str = "meterline.events.dead"
    partitions: int = 6
    replication_factor: int = 1
    compression: str | None = None  # gzip, snappy, lz4 or zstd
    # Off only for brokers without it (the test broker); on, retries cannot duplicate records.
    idempotence: bool = True
    linger_ms: int = 5
    max_batch_bytes: int = 1024 * 1024
    max_request_bytes: int = 8 * 1024 * 1024
    start_timeout_seconds: float = 30.0
    consumer_group: str = "meterline-core"

    def producer(self, **overrides: Any) -> AIOKafkaProducer:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": self.idempotence,
            "compression_type": self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_bytes,
            "max_request_size": self.max_request_bytes,
        }
        return AIOKafkaProducer(**(options | overrides))


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create the event and dead-letter topics if missing; verify their partition counts."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    async with asyncio.timeout(settings.start_timeout_seconds):
        await retrying(admin.start)
    try:
        wanted = [settings.topic, settings.dead_letter_topic]
        try:
            await admin.create_topics(
                [
                    NewTopic(name, settings.partitions, settings.replication_factor)
                    for name in wanted
                ]
            )
        except TopicAlreadyExistsError:
            pass
        for description in await admin.describe_topics(wanted):
            count = len(description.get("partitions", []))
            if description["topic"] == settings.topic and count != settings.partitions:
                log.warning(
                    "topic %s has %d partitions, not the configured %d; using it as it is",
                    settings.topic,
                    count,
                    settings.partitions,
                )
    finally:
        await admin.close()


async def retrying(start: Any) -> None:
    """Call `start` until the broker answers (the caller bounds the wait)."""
    while True:
        try:
            await start()
            return
        except KafkaError as exc:
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(0.5)


def encode_records(events: Sequence[Event], organization_id: str, ingested_at_us: int) -> bytes:
    """The request's records, framed for the event loop (runs in validation workers)."""
    keys = [record_key(organization_id, e) for e in events]
    table = pa.Table.from_arrays(
        [
            pa.array(keys, pa.binary()),
            pa.array([record_value(e, organization_id, ingested_at_us) for e in events]),
            pa.array([e.external_id for e in events], pa.string()),
        ],
        schema=_FRAMES,
    )
    return write_ipc(table)


def partition_of(key: bytes, partitions: int) -> int:
    """A stable partition per key: one customer's events stay in order on one partition."""
    return zlib.crc32(key) % partitions


class KafkaPublisher:
    """Publishes validated events to the events topic. An async context manager."""

    def __init__(self, settings: KafkaSettings, validation: ValidationPool) -> None:
        self._settings = settings
        self._validation = validation
        self._producer: AIOKafkaProducer | None = None
        self._partitions = settings.partitions

    async def __aenter__(self) -> Self:
        await ensure_topics(self._settings)
        producer = self._settings.producer()
        async with asyncio.timeout(self._settings.start_timeout_seconds):
            await retrying(producer.start)
            found = await producer.partitions_for(self._settings.topic)
        self._partitions = len(found)
        self._producer = producer
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._producer is not None:
            await self._producer.stop()  # flushes what is still buffered
            self._producer = None

    async def publish(
        self, organization_id: str, body: bytes, received_at_us: int
    ) -> PublishResult:
        producer = self._producer
        if producer is None:
            raise Unavailable("The publisher is not running.", 1)
        frames = await self._validation.validate(body, received_at_us, organization_id)
        table = read_ipc(frames)
        keys: list[Any] = table.column("key").to_pylist()
        values: list[Any] = table.column("value").to_pylist()
        # A repeat of an external_id inside one request is a duplicate, as in embedded mode;
        # repeats across requests are removed by the core.
        seen: set[str] = set()
        by_partition: dict[int, list[int]] = {}
        for i, external_id in enumerate(table.column("external_id").to_pylist()):
            if external_id is not None:
                if external_id in seen:
                    continue
                seen.add(external_id)
            by_partition.setdefault(partition_of(keys[i], self._partitions), []).append(i)
        timestamp_ms = received_at_us // 1000
        acks: list[asyncio.Future[Any]] = []
        try:
            for partition, rows in by_partition.items():
                batch = producer.create_batch()
                for i in rows:
                    if batch.append(key=keys[i], value=values[i], timestamp=timestamp_ms) is None:
                        acks.append(await self._send(producer, batch, partition))
                        batch = producer.create_batch()
                        batch.append(key=keys[i], value=values[i], timestamp=timestamp_ms)
                acks.append(await self._send(producer, batch, partition))
            await asyncio.gather(*acks)
        except KafkaError as exc:
            raise Unavailable(
                f"The event log did not accept the events ({exc}); retry.", 1
            ) from exc
        finally:
            for ack in acks:  # a failed gather leaves the others unobserved
                if ack.done() and not ack.cancelled():
                    ack.exception()
        accepted = sum(len(rows) for rows in by_partition.values())
        return PublishResult(accepted, table.num_rows - accepted)

    async def _send(
        self, producer: AIOKafkaProducer, batch: Any, partition: int
    ) -> asyncio.Future[Any]:
        batch.close()
        future: asyncio.Future[Any] = await producer.send_batch(
            batch, self._settings.topic, partition=partition
        )
        return future
