"""The Kafka publisher: a request's validated events as columnar records (`meters.columnar`,
one per partition it touches), acknowledged by all in-sync replicas before it is answered.

Validation workers encode the records, so the event loop only hands a few values to the
producer and waits for their acknowledgements. Every wait is bounded by the ingest deadline
(the route's timeout): a broker that is down or slow yields 503, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.errors import Unavailable
from ingest.publish import PublishResult
from ingest.validation import ValidationPool
from meters import columnar

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: str
    topic: str = "meterline.events"
    dead_letter_topic: str = "meterline.events.dead"
    partitions: int = 6
    replication_factor: int = 1
    compression: str | None = None  # of Kafka batches: gzip, snappy, lz4 or zstd
    # Of the columnar records, whole (zstd, lz4 or none); see the README's measurements.
    record_compression: str = "zstd"
    # A columnar record holds at most about this many bytes of uncompressed columns.
    max_record_bytes: int = 1024 * 1024
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
        encode = partial(
            columnar.encode,
            organization_id=organization_id,
            ingested_at_us=received_at_us,
            partitions=self._partitions,
            compression=self._settings.record_compression,
            max_record_bytes=self._settings.max_record_bytes,
        )
        encoded = await self._validation.validate(body, received_at_us, encode)
        key = organization_id.encode()
        timestamp_ms = received_at_us // 1000
        acks: list[asyncio.Future[Any]] = []
        try:
            for record in encoded.records:  # a loop: `acks` must hold what was sent if one fails
                acks.append(  # noqa: PERF401
                    await producer.send(
                        self._settings.topic,
                        record.value,
                        key=key,
                        partition=record.partition,
                        timestamp_ms=timestamp_ms,
                        headers=record.headers,
                    )
                )
            await asyncio.gather(*acks)
        except KafkaError as exc:
            raise Unavailable(
                f"The event log did not accept the events ({exc}); retry.", 1
            ) from exc
        finally:
            for ack in acks:  # a failed gather leaves the others unobserved
                if ack.done() and not ack.cancelled():
                    ack.exception()
        accepted = sum(record.events for record in encoded.records)
        return PublishResult(accepted, encoded.duplicates)
