"""The consumer core: applies the events topic to the store, exactly once in effect.

Each poll becomes one writer job holding the decoded events and the partitions' next offsets
(`ConsumedBatch`), so events, rollups and offsets commit together; on assignment the consumer
seeks to the offsets stored in DuckDB (Kafka's committed offsets are written too, afterwards,
only for lag tools). Records that cannot be applied go to the dead-letter topic, with the reason
and their origin in headers, before their offsets advance: a partition is never blocked, and a
crash between the two repeats the dead letter (at least once), never loses it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import pyarrow as pa
from aiokafka import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.structs import ConsumerRecord

from aggregator.store import Store
from aggregator.store.columns import to_table
from aggregator.store.consumed import ConsumedBatch, stored_offsets
from aggregator.store.events import known_customers
from ingest.publish.kafka import KafkaSettings, ensure_topics, retrying
from meters.events import EventRules, now_us
from meters.records import Record, Rejected, decode_records

log = logging.getLogger(__name__)
_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    max_records: int = 20_000  # per poll, i.e. per transaction at most
    poll_timeout_ms: int = 50
    max_record_bytes: int = 1024 * 1024
    retry_seconds: float = 1.0  # after a failed batch, before reading it again


class Consumer:
    """Runs in the background while open. An async context manager."""

    def __init__(
        self,
        store: Store,
        kafka: KafkaSettings,
        rules: EventRules,
        organization_exists: Callable[[str], bool],
        settings: ConsumerSettings | None = None,
    ) -> None:
        self._store = store
        self._kafka = kafka
        self._rules = rules
        self._organization_exists = organization_exists
        self._settings = settings or ConsumerSettings()
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters: Any = None
        self._task: asyncio.Task[None] | None = None
        self.applied = 0
        self.dead_lettered = 0
        self.commit_seconds: collections.deque[float] = collections.deque(maxlen=1000)

    async def __aenter__(self) -> Self:
        kafka = self._kafka
        await ensure_topics(kafka)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap,
            group_id=kafka.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._settings.poll_timeout_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._consumer.subscribe([kafka.topic], listener=_SeekToStored(self))
        self._dead_letters = kafka.producer(linger_ms=0)
        async with asyncio.timeout(kafka.start_timeout_seconds):
            await retrying(self._consumer.start)
            await retrying(self._dead_letters.start)
        self._task = asyncio.create_task(self._run(), name="kafka-consumer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._dead_letters is not None:
            await self._dead_letters.stop()

    async def lag(self) -> dict[int, int]:
        """Records not yet applied, per assigned partition (high watermark as of the last
        fetch)."""
        consumer = self._consumer
        if consumer is None:
            return {}
        lags = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                lags[tp.partition] = max(0, high - await consumer.position(tp))
        return lags

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while True:
            fetched = await consumer.getmany(
                timeout_ms=self._settings.poll_timeout_ms, max_records=self._settings.max_records
            )
            if not fetched:
                continue
            try:
                await self._apply(fetched)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Nothing of the batch was committed: read it again from the stored offsets.
                log.exception("applying a batch failed; retrying from the stored offsets")
                await asyncio.sleep(self._settings.retry_seconds)
                await self.seek_to_stored(consumer.assignment())

    async def seek_to_stored(self, partitions: Sequence[TopicPartition] | set[Any]) -> None:
        assert self._consumer is not None
        stored = await self._store.read(stored_offsets, self._kafka.topic)
        for tp in partitions:
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
            else:
                await self._consumer.seek_to_beginning(tp)

    async def _apply(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        records = [r for batch in fetched.values() for r in batch]
        decoded = decode_records(
            [r.value for r in records],
            [r.timestamp for r in records],
            now_us=now_us(),
            rules=self._rules,
            max_bytes=self._settings.max_record_bytes,
        )
        dead: list[tuple[ConsumerRecord, str]] = []
        good: list[tuple[ConsumerRecord, Record]] = []
        for record, result in zip(records, decoded, strict=True):
            if isinstance(result, Rejected):
                dead.append((record, result.reason))
            elif not self._organization_exists(result.organization_id):
                dead.append((record, "organization_id: no such organization"))
            else:
                good.append((record, result))
        # Events naming a customer_id need that customer (Polar's rule).
        wanted = sorted({r.event.customer_id for _, r in good if r.event.customer_id})
        if wanted:
            known = await self._store.read(known_customers, wanted)
            unknown = [
                (record, r)
                for record, r in good
                if r.event.customer_id and (r.organization_id, r.event.customer_id) not in known
            ]
            dead += [(record, "customer_id: Customer not found.") for record, _ in unknown]
            dropped = {id(record) for record, _ in unknown}
            good = [pair for pair in good if id(pair[0]) not in dropped]
        if dead:
            await self._dead_letter(dead)
        offsets = {tp: batch[-1].offset + 1 for tp, batch in fetched.items()}
        assert self._store.seq is not None
        job = ConsumedBatch(
            self._kafka.topic,
            _table([r for _, r in good]),
            {tp.partition: o for tp, o in offsets.items()},
            self._store.seq,
        )
        started = time.perf_counter()
        await self._store.write(job, weight=max(1, len(good)))
        self.commit_seconds.append(time.perf_counter() - started)
        self.applied += len(good)
        self.dead_lettered += len(dead)
        assert self._consumer is not None
        try:  # for lag tools only: the offsets stored in DuckDB are the truth
            await self._consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - best effort by design
            log.debug("Kafka offset commit failed: %s", exc)

    async def _dead_letter(self, dead: list[tuple[ConsumerRecord, str]]) -> None:
        acks = []
        for record, reason in dead:
            log.warning(
                "dead-lettering %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                reason,
            )
            headers = [
                ("meterline.reason", reason.encode()),
                ("meterline.topic", record.topic.encode()),
                ("meterline.partition", str(record.partition).encode()),
                ("meterline.offset", str(record.offset).encode()),
            ]
            acks.append(
                await self._dead_letters.send(
                    self._kafka.dead_letter_topic,
                    value=record.value,
                    key=record.key,
                    headers=headers,
                )
            )
        await asyncio.gather(*acks)


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner.seek_to_stored(assigned)


def _table(records: list[Record]) -> pa.Table:
    table = to_table([r.event for r in records])
    table = table.append_column(
        "organization_id", pa.array([r.organization_id for r in records], pa.string())
    )
    return table.append_column("ingested_at", pa.array([r.ingested_at_us for r in records], _TS))
