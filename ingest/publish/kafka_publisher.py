"""The Kafka publisher: a request's validated events as columnar records (`meters.columnar`,
one per partition it touches), acknowledged by all in-sync replicas before it is answered.

Validation workers encode the records, so the event loop only hands a few values to the
producer and waits for their acknowledgements. Every wait is bounded by the ingest deadline
(the route's timeout): a broker that is down or slow yields 503, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from functools import partial
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest.errors import Unavailable
from ingest.kafka import KafkaSettings, ensure_topics, start_producer, starting, stop_within
from ingest.publish import Progress, PublishResult
from ingest.validation import ValidationPool
from meters import columnar
from meters.pricing import Pricing

log = logging.getLogger(__name__)


class KafkaPublisher:
    """Publishes validated events to the events topic. An async context manager."""

    def __init__(self, settings: KafkaSettings, validation: ValidationPool) -> None:
        self._settings = settings
        self._validation = validation
        self._producer: AIOKafkaProducer | None = None
        self._partitions = settings.partitions

    async def __aenter__(self) -> Self:
        await ensure_topics(self._settings)
        async with starting(self._settings) as retry:
            producer = await retry(partial(start_producer, self._settings))
        try:
            async with starting(self._settings):
                found = await producer.partitions_for(self._settings.topic)
        except BaseException:
            # Started halfway: stop what runs, then fail.
            await stop_within(producer.stop, self._settings.stop_timeout_seconds, "producer")
            raise
        self._partitions = len(found)
        self._producer = producer
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # Flushes what is still buffered; nothing unacknowledged was answered 2xx.
            await stop_within(producer.stop, self._settings.stop_timeout_seconds, "producer")

    async def publish(
        self,
        organization_id: str,
        body: bytes,
        received_at_us: int,
        progress: Progress | None = None,
        pricing: Pricing | None = None,
    ) -> PublishResult:
        progress = progress or Progress()
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
        unpriced: Counter[str] = Counter()
        encoded = await self._validation.validate(body, received_at_us, encode, pricing, unpriced)
        progress.waiting_for = "the event log's acknowledgement of its records"
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
            written = await asyncio.gather(*acks)
        except KafkaError as exc:
            raise Unavailable(
                f"The event log did not accept the events ({exc}); retry.", 1
            ) from exc
        finally:
            for ack in acks:  # a failed gather leaves the others unobserved
                if ack.done() and not ack.cancelled():
                    ack.exception()
        accepted = sum(record.events for record in encoded.records)
        after: dict[int, int] = {}
        for metadata in written:
            after[metadata.partition] = max(metadata.offset + 1, after.get(metadata.partition, 0))
        return PublishResult(accepted, encoded.duplicates, unpriced, tuple(sorted(after.items())))

    async def dead_letter(self, organization_id: str, letters: list[tuple[str, bytes]]) -> None:
        """Keyed by the organization, as its columnar records are, so that its dead-letter view
        shows them; sent within the send timeout, else logged (the refusal was answered)."""
        producer = self._producer
        if producer is None or not letters:
            return
        try:
            async with asyncio.timeout(self._settings.send_timeout_seconds):
                acks = [
                    await producer.send(
                        self._settings.dead_letter_topic,
                        value,
                        key=organization_id.encode(),
                        headers=[("meterline.reason", reason.encode())],
                    )
                    for reason, value in letters
                ]
                await asyncio.gather(*acks)
        except (KafkaError, TimeoutError) as exc:
            log.error(
                "%d refused spans of %s not dead-lettered: %s", len(letters), organization_id, exc
            )
