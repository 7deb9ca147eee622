"""Kafka direct: batches as records on meterline's events topic, written as an ingest edge
writes them (columnar records, `meters.columnar`: one per partition, same partitions), acked by
all in-sync replicas. For producers next to the broker that should not go through HTTP;
`records()` gives the same records to a producer of your own.

The events are checked by the ingest rules first, so an event the core would dead-letter is
reported to on_error as EventsRejected (a 422 with the same `loc`s) instead. What the rules
cannot know here (an unknown customer_id) is dead-lettered by the core as for any producer.
A batch sent again after a broker error keeps its external_ids: the core applies each once.

    from ingest.sdk import Ingestion
    from ingest.sdk.kafka import KafkaTransport

    ingestion = Ingestion(transport=KafkaTransport("kafka:9092", organization_id=ORG_ID))
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest.kafka import KafkaSecurity, KafkaSettings, start_producer, stop_within
from ingest.sdk.delivery import Answer
from ingest.sdk.errors import TransportError
from meters import columnar
from meters.columnar import Record
from meters.errors import ValidationFailed
from meters.events import EventRules, validate_body
from meters.times import now_us

__all__ = [
    "AsyncKafkaTransport",
    "KafkaOptions",
    "KafkaSecurity",
    "KafkaTransport",
    "Record",
    "records",
]

log = logging.getLogger(__name__)


def records(
    events: Sequence[dict[str, Any]] | bytes,
    organization_id: str,
    *,
    partitions: int,
    rules: EventRules | None = None,
    compression: str = "zstd",
    received_at_us: int | None = None,
) -> tuple[list[Record], int]:
    """The columnar records of `events` (dicts as `POST /v1/events/ingest` takes them, or that
    JSON body as bytes) for a topic of `partitions` partitions, and how many events repeated
    an external_id of the batch (not sent). Raises `ValidationFailed` (each error's `loc`)
    when an event breaks a rule, as ingest answers 422."""
    received = now_us() if received_at_us is None else received_at_us
    body = events if isinstance(events, bytes) else orjson.dumps({"events": list(events)})
    table = validate_body(body, now=received, rules=rules or EventRules())
    encoded = columnar.encode(
        table, organization_id, received, partitions=partitions, compression=compression
    )
    return encoded.records, encoded.duplicates


class KafkaOptions(TypedDict, total=False):
    topic: str  # default "meterline.events"
    # Default True; a broker without idempotent producers gets a producer without, with a
    # warning (False skips the attempt).
    idempotence: bool
    compression: str | None  # gzip, snappy, lz4 or zstd; default none
    timeout: float  # for one batch to be acknowledged, s (default 10)
    security: KafkaSecurity  # TLS, mutual TLS, SASL (default: PLAINTEXT)
    rules: EventRules  # the core's rules (default: EventRules())


class AsyncKafkaTransport:
    """Produces on the running event loop (the producer starts on the first send)."""

    def __init__(
        self, bootstrap: str, organization_id: str, **options: Unpack[KafkaOptions]
    ) -> None:
        self._options = options
        self._bootstrap = bootstrap
        self._organization_id = organization_id
        self._settings = KafkaSettings(
            bootstrap=bootstrap,
            topic=options.get("topic", "meterline.events"),
            idempotence=options.get("idempotence", True),
            compression=options.get("compression"),
            security=options.get("security", KafkaSecurity()),
        )
        self._timeout = options.get("timeout", 10.0)
        self._rules = options.get("rules") or EventRules()
        self._producer: AIOKafkaProducer | None = None
        self._partitions = 0
        self._starting = asyncio.Lock()  # concurrent first sends start one producer

    async def send(self, events: Sequence[bytes]) -> Answer:
        received = now_us()
        organization = self._organization_id
        body = b'{"events":[' + b",".join(events) + b"]}"
        try:
            producer = await self._started()
            async with asyncio.timeout(self._timeout):
                try:
                    found, duplicates = records(
                        body,
                        organization,
                        partitions=self._partitions,
                        rules=self._rules,
                        received_at_us=received,
                    )
                except ValidationFailed as exc:
                    detail = [error.as_dict() for error in exc.errors]
                    error = {"error": "RequestValidationError", "detail": detail}
                    return Answer(422, orjson.dumps(error))
                acks = [
                    await producer.send(
                        self._settings.topic,
                        value=record.value,
                        key=organization.encode(),
                        partition=record.partition,
                        timestamp_ms=received // 1000,
                        headers=record.headers,
                    )
                    for record in found
                ]
                await asyncio.gather(*acks)
        except (KafkaError, TimeoutError) as exc:
            raise TransportError(f"Kafka: {type(exc).__name__}: {exc}") from exc
        sent = sum(record.events for record in found)
        return Answer(200, orjson.dumps({"inserted": sent, "duplicates": duplicates}))

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            return self._producer or await self._start()

    async def _start(self) -> AIOKafkaProducer:
        """A started producer, within `timeout`. A broker without idempotent producers (Tansu)
        gets one without idempotence, said once as a warning (`ingest.kafka.start_producer`):
        every event the SDK sends has an external_id, so a batch written twice is applied once
        by the core."""
        settings = self._settings
        async with asyncio.timeout(self._timeout):
            producer = await start_producer(settings)
        try:
            async with asyncio.timeout(self._timeout):
                found = await producer.partitions_for(settings.topic)
            if not found:
                raise KafkaError(f"topic {settings.topic} not found")
        except BaseException:
            await stop_within(producer.stop, settings.stop_timeout_seconds, "producer")
            raise
        self._producer, self._partitions = producer, len(found)
        return producer

    async def aclose(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_within(producer.stop, self._settings.stop_timeout_seconds, "producer")

    def blocking(self) -> KafkaTransport:
        return KafkaTransport(self._bootstrap, self._organization_id, **self._options)


class KafkaTransport:
    """The blocking form: an AsyncKafkaTransport on a private event loop thread."""

    def __init__(
        self, bootstrap: str, organization_id: str, **options: Unpack[KafkaOptions]
    ) -> None:
        self._inner = AsyncKafkaTransport(bootstrap, organization_id, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="meterline-sdk-kafka", daemon=True
        )
        self._thread.start()

    def send(self, events: Sequence[bytes]) -> Answer:
        return asyncio.run_coroutine_threadsafe(self._inner.send(events), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._inner.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
