"""Reading the dead-letter topic back (Kafka mode): the most recent records, each with why the
core refused it, where it came from and whose it is. The API's `GET /v1/dead-letters/` reads
through it; so can tools.

The consumer writes them (`consumer.Consumer._dead_letter`): the reason and the origin in
`meterline.*` headers; the value is the refused record (or, for one row of a columnar record,
that row as a JSON record). A record is an organization's when every place that names an
organization agrees on it: the key's `<organization>/` prefix (or the whole key, as columnar
records are keyed), the columnar `meterline.organization` header, the JSON value's
`organization_id`. A record where they disagree or none names one is nobody's, and one naming
an organization that does not exist matches no tenant: neither is shown to any tenant.

Reading is on demand and bounded: a consumer outside any group assigns every partition, reads
at most `scan` of the newest records (shared between partitions) and stops at the partitions'
ends or at `timeout_seconds`, whichever comes first.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from functools import partial

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from aggregator.errors import QueryTimeout
from aggregator.settings import DEAD_LETTER_SCAN
from ingest.kafka import KafkaSettings, start_producer, starting, stop_within
from meters.columnar import H_ORGANIZATION

__all__ = [
    "HEADERS",
    "DeadLetter",
    "Scan",
    "organization_of",
    "read_at",
    "read_recent",
    "replay",
]

SCAN = DEAD_LETTER_SCAN
TIMEOUT_SECONDS = 5.0
_REASON, _TOPIC, _PARTITION, _OFFSET, _ROW = (
    f"meterline.{name}" for name in ("reason", "topic", "partition", "offset", "row")
)
# The headers the consumer adds to a dead letter; the rest are the refused record's own.
HEADERS = frozenset((_REASON, _TOPIC, _PARTITION, _OFFSET, _ROW))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp_ms: int
    reason: str
    origin_topic: str | None
    origin_partition: int | None
    origin_offset: int | None
    origin_row: int | None  # a columnar record's row, sent alone
    organization_id: str | None  # None: nobody's
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Scan:
    """The records read, newest first; `complete` when they are the whole topic (nothing
    older left unread, no partition cut short by the deadline)."""

    letters: list[DeadLetter]
    complete: bool


async def read_recent(
    kafka: KafkaSettings, *, scan: int = SCAN, timeout_seconds: float = TIMEOUT_SECONDS
) -> Scan:
    """The newest `scan` dead letters at most. QueryTimeout when the broker does not answer
    within `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    consumer = _reader(kafka, timeout_seconds)
    try:
        async with asyncio.timeout(timeout_seconds):
            await consumer.start()
            await consumer.topics()  # the cluster's metadata, the dead-letter topic's included
        return await _read(consumer, kafka.dead_letter_topic, scan, deadline)
    except (TimeoutError, KafkaError):
        raise QueryTimeout(timeout_seconds) from None
    finally:
        await stop_within(consumer.stop, kafka.stop_timeout_seconds, "dead-letter reader")


async def read_at(
    kafka: KafkaSettings, partition: int, offset: int, *, timeout_seconds: float = TIMEOUT_SECONDS
) -> DeadLetter | None:
    """The dead letter at `partition`@`offset`, or None when the topic holds none there."""
    consumer = _reader(kafka, timeout_seconds)
    tp = TopicPartition(kafka.dead_letter_topic, partition)
    try:
        async with asyncio.timeout(timeout_seconds):
            await consumer.start()
            await consumer.topics()
            if partition not in (consumer.partitions_for_topic(tp.topic) or ()):
                return None
            consumer.assign([tp])
            if not (await consumer.beginning_offsets([tp]))[tp] <= offset:
                return None
            if offset >= (await consumer.end_offsets([tp]))[tp]:
                return None
            consumer.seek(tp, offset)
            while True:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    return _letter(record) if record.offset == offset else None
    except (TimeoutError, KafkaError):
        raise QueryTimeout(timeout_seconds) from None
    finally:
        await stop_within(consumer.stop, kafka.stop_timeout_seconds, "dead-letter reader")


async def replay(kafka: KafkaSettings, letters: list[tuple[DeadLetter, bytes | None]]) -> None:
    """Publish each letter's record again to the events topic, with `value` (the letter's own
    or a corrected one) and the record's own headers, to the partition it came from (where its
    customer's other events are); acknowledged, in order. The core's dedupe by external_id
    makes a record applied twice count once."""
    async with starting(kafka) as retry:
        producer = await retry(partial(start_producer, kafka, linger_ms=0))
    try:
        async with starting(kafka):
            partitions = await producer.partitions_for(kafka.topic)
        for letter, value in letters:
            headers = [(n, v) for n, v in letter.headers if n not in HEADERS]
            origin = letter.origin_partition
            await producer.send_and_wait(
                kafka.topic,
                value,
                key=letter.key,
                headers=headers,
                partition=origin if origin in partitions else None,
            )
    finally:
        await stop_within(producer.stop, kafka.stop_timeout_seconds, "replay producer")


def _reader(kafka: KafkaSettings, timeout_seconds: float) -> AIOKafkaConsumer:
    """A consumer outside any group (it commits nothing)."""
    return kafka.reader(request_timeout_ms=max(1000, int(timeout_seconds * 1000)))


async def _read(consumer: AIOKafkaConsumer, topic: str, scan: int, deadline: float) -> Scan:
    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    if not partitions:
        return Scan([], True)  # no dead letter was ever written
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
    share = max(1, scan // len(tps))
    complete = True
    for tp in tps:
        first = max(starts[tp], ends[tp] - share)
        complete &= first == starts[tp]
        consumer.seek(tp, first)
    remaining = {tp for tp in tps if ends[tp] > max(starts[tp], ends[tp] - share)}
    letters: list[DeadLetter] = []
    while remaining and (left := deadline - time.monotonic()) > 0:
        fetched = await consumer.getmany(*remaining, timeout_ms=int(min(left, 0.5) * 1000))
        for records in fetched.values():
            # Those past the end read at the start too: a broker may report the end of a
            # batch of several records short (the test broker does), and a few newer ones
            # cost nothing.
            letters += map(_letter, records)
        for tp in list(remaining):
            records = fetched.get(tp, [])
            # The end seen, or nothing returned and nothing left (an end past a gap in the
            # offsets). Not the position alone: it counts records fetched but not returned yet.
            last = records[-1].offset + 1 if records else await consumer.position(tp)
            if last >= ends[tp]:
                remaining.discard(tp)
    letters.sort(key=lambda d: (d.timestamp_ms, d.partition, d.offset), reverse=True)
    return Scan(letters, complete and not remaining)


def _letter(record: ConsumerRecord) -> DeadLetter:
    headers = tuple((name, bytes(value)) for name, value in record.headers)
    named = dict(headers)
    return DeadLetter(
        record.partition,
        record.offset,
        record.timestamp,
        _text(named.get(_REASON)) or "unknown",
        _text(named.get(_TOPIC)),
        _number(named.get(_PARTITION)),
        _number(named.get(_OFFSET)),
        _number(named.get(_ROW)),
        organization_of(record.key, record.value, named.get(H_ORGANIZATION)),
        record.key,
        record.value,
        headers,
    )


def organization_of(key: bytes | None, value: bytes | None, header: bytes | None) -> str | None:
    """The organization every place that names one agrees on (see the module's note)."""
    claims = [] if header is None else [_uuid(header)]
    prefix = _uuid(key.partition(b"/")[0]) if key else None
    if prefix is not None:  # other producers may key records as they like
        claims.append(prefix)
    try:
        decoded = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        decoded = None
    if isinstance(decoded, dict) and "organization_id" in decoded:
        claim = decoded["organization_id"]
        claims.append(_uuid(claim.encode()) if isinstance(claim, str) else None)
    return claims[0] if claims and all(c == claims[0] for c in claims) else None


def _uuid(claim: bytes) -> str | None:
    try:
        return str(uuid.UUID(claim.decode()))
    except (UnicodeDecodeError, ValueError):
        return None


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode(errors="replace")


def _number(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None
