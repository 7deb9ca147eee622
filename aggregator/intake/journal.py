"""The journal: the one order in which every core applies the topics.

A core reads the events topic's partitions and the control topic as its fetches come, so without
it seqs, which of two events with one external id wins and whether a write is applied before or
after the events its outcome depends on would be the core's own. The core that applies a group of
records first appends an entry naming them to `<topic>.journal` (one partition); every core
applies groups in the journal's order. The protocol:

1. Catch up (at start, and after a group failed to apply): wait for the groups in flight, then
   read the journal from this core's position (the entry after the last group applied here,
   stored with it: `ConsumedBatch.positions`, `Live.advance`; the journal's start when none) to
   its end, and apply each entry as its topic's follower does (`Follower.replay`): the same
   records in the same order, the same dead rows left out, the same time. An entry of an older
   epoch than one applied before it is skipped (its writer had been replaced); one that does
   not start where its partitions' applied offsets end is refused by the store and skipped, on
   every core alike. What is skipped depends on the journal alone: the greatest epoch applied
   is stored with the position (`_positions`). (`_catch_up`)
2. A core that leads draws its epoch: one more than the greatest applied. (`_catch_up`)
3. Append (the leader's followers' live loops: `append`): under one lock, a group's ranges must
   start where the last ranges appended or replayed for their partitions ended (else
   `OffsetGap`: the caller reads again from the stored offsets). The entry (ranges in apply
   order, dead rows, time, epoch) is produced and acknowledged; if it landed anywhere but at the
   journal's end as this core knows it, another core appended meanwhile (this one was paused,
   or lost the lease): nothing is queued, the journal is behind (step 1 next, which applies the
   entry or skips it as every core does) and the caller gets `OffsetGap`; if any of those
   entries has a later epoch than this core's, its writer drew it after this core did, and this
   core stops leading (the lease hands it back if it still holds it). Else the group's job is
   queued in the writer before the lock is released: the writer applies groups in the
   journal's order.
4. The caller answers (API writes, dead-letter counts) once the group has committed. A group
   that fails to apply (the disk, a closing store), or whose entry may or may not have been
   appended (no acknowledgement), marks the journal behind: the next append catches up first
   (step 1), which applies what the journal holds, that group included if it was appended.
5. Each group's job stores the journal position after its entry with what it applied, never
   ahead of what is stored (`Live.advance`; events: by the flush that stores them). A core
   killed anywhere resumes at step 1 from the last group stored; groups of writes applied after
   it are applied again, and their stored outcomes answer.
6. A core that follows (`leadership`: another core leads) never appends: it reads the journal
   on from its position as entries come and applies each as step 1 does (`_tail`); a group
   that fails to apply is read again from the stored position after a pause. Once it leads,
   its first append catches up first (step 1) and draws its epoch (step 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from aggregator.errors import JournalLost, NotLeading, OffsetGap
from aggregator.intake.leadership import Role
from aggregator.store import Job, Positions, Store
from ingest.kafka import KafkaSettings, ensure_topics, start_producer, starting, stop_within
from ingest.tasks import cancel_within

log = logging.getLogger(__name__)

T = TypeVar("T")
VERSION = 1
# A range's records not all read within this long: the log lost them (retention), or the broker
# is gone; the catch-up fails and is tried again.
READ_SECONDS = 30.0
RETRY_SECONDS = 1.0  # a replica's pause before it reads again what failed to apply
BACKFILL = "backfill"  # what entries of a backfill's steps name as their topic (no Kafka topic)
PLANS = "plans"  # and those of credit plans' cycles
EFFECTS = "effects"  # and those of what the leader's side effects recorded
VOIDS = "voids"  # and those of void jobs' steps

Records = list[ConsumerRecord[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Entry:
    """One group of records, as the journal holds it."""

    topic: str
    # (partition, first offset, next offset), in the order the records were applied.
    ranges: tuple[tuple[int, int, int], ...]
    at_us: int  # the group's time: what its events were ingested at
    epoch: int = 0
    # Rows left out, dead-lettered by the core that appended the entry: (partition, offset,
    # row in the record, or None for the whole record).
    dead: tuple[tuple[int, int, int | None], ...] = ()
    # Partitions that resume from their log's start, the log no longer holding their stored
    # offset (`OffsetReset`): (partition, stored offset, log start, log end, offsets vanished or
    # None). An entry of resets names no ranges.
    resets: tuple[tuple[int, int, int, int, int | None], ...] = ()
    # A backfill's step instead of records (`backfill`): (meter id, its version, events at
    # most), applied at this place in the journal's order by every core.
    backfill: tuple[str, int, int] | None = None
    # Credit plans' boundaries due at `at_us` instead of records (`plan_cycler`): at most this
    # many, applied at this place in the journal's order by every core.
    cycles: int | None = None
    # What a side effect recorded instead of records (`upstream.progress`: the upstream's
    # answers to the forwarder, webhook deliveries): the name of the change and its arguments
    # (JSON), applied by every core, so that a new leader goes on from where the last left off.
    effect: tuple[str, tuple[Any, ...]] | None = None
    # A void job's step instead of records (`voids`): (job id, the seq it voids up to),
    # applied at this place in the journal's order by every core.
    void: tuple[str, int] | None = None

    def next_offsets(self) -> dict[int, int]:
        """Where each partition's next group starts once this one is applied."""
        return {p: end for p, _, end in self.ranges} | {r[0]: r[2] for r in self.resets}


def encode(entry: Entry) -> bytes:
    return orjson.dumps(
        {
            "v": VERSION,
            "topic": entry.topic,
            "ranges": entry.ranges,
            "at_us": entry.at_us,
            "epoch": entry.epoch,
            "dead": entry.dead,
            "resets": entry.resets,
            **({"backfill": entry.backfill} if entry.backfill else {}),
            **({"cycles": entry.cycles} if entry.cycles is not None else {}),
            **({"effect": entry.effect} if entry.effect else {}),
            **({"void": entry.void} if entry.void else {}),
        }
    )


def decode(value: bytes) -> Entry:
    """An entry (ValueError if the value is not one this version reads)."""
    data = orjson.loads(value)
    if not isinstance(data, dict) or data.get("v") != VERSION:
        raise ValueError(f"not a journal entry of version {VERSION}")
    try:
        return Entry(
            str(data["topic"]),
            tuple((int(p), int(f), int(n)) for p, f, n in data["ranges"]),
            int(data["at_us"]),
            int(data["epoch"]),
            tuple((int(p), int(o), None if r is None else int(r)) for p, o, r in data["dead"]),
            tuple(
                (int(p), int(stored), int(start), int(end), None if gone is None else int(gone))
                for p, stored, start, end, gone in data.get("resets", ())
            ),
            _backfill(data.get("backfill")),
            None if data.get("cycles") is None else int(data["cycles"]),
            _effect(data.get("effect")),
            _void(data.get("void")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad journal entry: {exc!r}") from None


def _backfill(value: Any) -> tuple[str, int, int] | None:
    if value is None:
        return None
    meter_id, version, chunk = value
    return str(meter_id), int(version), int(chunk)


def _void(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    job_id, up_to = value
    return str(job_id), int(up_to)


def _effect(value: Any) -> tuple[str, tuple[Any, ...]] | None:
    if value is None:
        return None
    name, args = value
    return str(name), tuple(args)


class Follower(Protocol):
    """What applies one topic's groups (the consumer, the control applier; the backfiller the
    steps of `BACKFILL`, the plan cycler the boundaries of `PLANS`, the voider the steps of
    `VOIDS`)."""

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        """Apply `records` (the entry's ranges, in its order) as the entry says, storing
        `positions` with them; return once committed. OffsetGap: refused, nothing applied."""
        ...


class Journal:
    """Appends entries and catches up on them. An async context manager; `start` once every
    follower is registered (`follow`)."""

    def __init__(self, store: Store, kafka: KafkaSettings, role: Role) -> None:
        self._store = store
        self._kafka = kafka
        self._role = role
        self._tail_task: asyncio.Task[None] | None = None
        self._partition = TopicPartition(kafka.journal_topic, 0)
        self._followers: dict[str, Follower] = {}
        self._lock = asyncio.Lock()
        self._started = asyncio.Event()
        self._behind = True
        self._epoch = 0  # this core's, drawn when it leads (step 2)
        self._seen = 0  # the greatest epoch of an entry applied: what an older one is skipped by
        self._end: int | None = None  # the journal's end as this core knows it (step 3)
        self._next: dict[tuple[str, int], int] = {}  # per partition, where a group must start
        self._inflight: set[asyncio.Future[Any]] = set()
        self._producer: Any = None
        self._reader: AIOKafkaConsumer | None = None
        self._ranges: _Ranges | None = None
        self.replayed = 0
        self.skipped = 0

    @property
    def epoch(self) -> int:
        return max(self._epoch, self._seen)

    def claim(self) -> tuple[bool, int, int]:
        """What this core claims the lease with (`leadership`): whether it leads, its epoch
        and its position (-1: none)."""
        position = self.position()
        return self._role.leading, self.epoch, -1 if position is None else position

    def position(self) -> int | None:
        """The journal offset after the last group applied here (None: none)."""
        return self._store.applied_offsets(self._kafka.journal_topic).get(0)

    async def lag(self) -> int:
        """The entries of the journal not applied here yet: its end as the broker says it now,
        less `position` (`/metrics`)."""
        assert self._reader is not None
        tp = self._partition
        end: int = (await self._reader.end_offsets([tp]))[tp]
        return max(0, end - (self.position() or 0))

    async def __aenter__(self) -> Self:
        kafka = self._kafka
        await ensure_topics(kafka)
        self._reader = kafka.reader(fetch_max_wait_ms=10)
        records = kafka.reader(fetch_max_wait_ms=10, max_partition_fetch_bytes=8 * 1024 * 1024)
        self._ranges = _Ranges(records)
        try:
            async with starting(kafka) as retry:
                self._producer = await retry(partial(start_producer, kafka, linger_ms=0))
                for client in (self._reader, records):
                    await retry(client.start)
            self._reader.assign([self._partition])
        except BaseException:
            await self._stop_clients()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._tail_task, what="journal")
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self._kafka.stop_timeout_seconds)
        await self._stop_clients()

    async def _stop_clients(self) -> None:
        bound = self._kafka.stop_timeout_seconds
        if self._producer is not None:
            await stop_within(self._producer.stop, bound, "journal producer")
        for reader in (self._reader, self._ranges.consumer if self._ranges else None):
            if reader is not None:
                await stop_within(reader.stop, bound, "journal reader")

    def follow(self, topic: str, follower: Follower) -> None:
        """`follower` applies the groups of `topic`."""
        self._followers[topic] = follower

    async def started(self) -> None:
        """Returns once the journal has caught up at start (step 1)."""
        await self._started.wait()

    async def start(self) -> None:
        """Steps 1 and 2, before any append; step 6 whenever this core follows."""
        async with self._lock:
            await self._catch_up()
        self._started.set()
        self._tail_task = asyncio.create_task(self._follow(), name="journal-tail")

    async def _follow(self) -> None:
        while True:
            await self._role.until(False)
            await self._tail()

    async def _tail(self) -> None:
        """Step 6, until this core leads."""
        assert self._reader is not None
        reader, tp = self._reader, self._partition
        async with self._lock:
            self._behind = True  # step 1 before this core's first append
            reader.resume(tp)
            reader.seek(tp, self.position() or 0)
        while True:
            # Under the lock: a core that has come to lead catches up on the same reader.
            async with self._lock:
                if self._role.leading:
                    return
                try:
                    fetched = await reader.getmany(tp, timeout_ms=100)
                    for record in fetched.get(tp, []):
                        await self._replay(record)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("applying the journal failed; reading it again")
                    await asyncio.sleep(RETRY_SECONDS)
                    reader.seek(tp, self.position() or 0)

    async def append(self, entry: Entry, queue: Callable[[Positions], Awaitable[T]]) -> T:
        """Step 3: append `entry`, then `queue` its group's job (with the positions to store
        with it) before any other entry is appended; the job's result once committed."""
        await self._started.wait()
        async with self._lock:
            if not self._role.leading:
                raise NotLeading("this core follows the journal: another core appends to it")
            if self._behind:
                await self._catch_up()
            for partition, first, _ in entry.ranges:
                expected = self._next.get((entry.topic, partition))
                if expected is not None and first != expected:
                    # Read before a catch-up or a reset moved the partition: the caller reads
                    # again from the stored offsets, and the next append starts from them.
                    self._behind = True
                    raise OffsetGap(f"{entry.topic}[{partition}] starts at {first}, not {expected}")
            entry = replace(entry, epoch=self._epoch)
            try:
                async with asyncio.timeout(self._kafka.send_timeout_seconds):
                    sent = await self._producer.send_and_wait(
                        self._kafka.journal_topic, encode(entry), partition=0
                    )
            except BaseException:
                self._behind = True  # appended or not: step 1 finds out
                raise
            if self._end is not None and sent.offset != self._end:
                self._behind = True
                rival = max(await self._epochs_between(self._end, sent.offset), default=-1)
                if rival > entry.epoch:  # another core drew its epoch after this one did
                    log.warning("the journal has entries of epoch %d: this core steps down", rival)
                    self._role.set(False)
                raise OffsetGap(f"journal entry {sent.offset} landed after another core's")
            self._end = sent.offset + 1
            applied = asyncio.ensure_future(queue(self._positions(sent.offset, entry.epoch)))
            self._inflight.add(applied)
            applied.add_done_callback(self._inflight.discard)
            # Before a catch-up waiting for it reads on: what it skips depends on this.
            applied.add_done_callback(partial(self._applied, entry.epoch))
            self._next.update(((entry.topic, p), n) for p, n in entry.next_offsets().items())
        try:
            return await applied
        except OffsetGap:
            raise  # refused: nothing applied, and every core refuses it alike
        except BaseException:
            self._behind = True  # step 4
            raise

    async def append_job(self, entry: Entry, job: Job[T]) -> T:
        """`append` for a group that is one job (a backfill's or a void's step, plan
        boundaries), stored
        with its positions; the job's result once committed."""
        return await self.append(entry, lambda at: self._store.queued_at(job, at))

    async def _catch_up(self) -> None:
        """Steps 1 and 2 (under the lock)."""
        assert self._reader is not None and self._ranges is not None
        if self._inflight:
            await asyncio.wait(self._inflight)
        self._reader.resume(self._partition)
        try:
            await self._read_to_end(self._reader, self._partition)
        finally:
            # Idle between catch-ups: an assigned partition is fetched in the background.
            self._reader.pause(self._partition)
            self._ranges.release()
        if self._role.leading:  # a follower only reads epochs (step 6)
            self._epoch = max(self._epoch, self._seen) + 1
        self._behind = False
        if self.replayed or self.skipped:
            log.info(
                "journal: at %s, %d groups applied, %d skipped; epoch %d",
                self.position(),
                self.replayed,
                self.skipped,
                self._epoch,
            )

    async def _read_to_end(self, reader: AIOKafkaConsumer, tp: TopicPartition) -> None:
        beginning = (await reader.beginning_offsets([tp]))[tp]
        end = (await reader.end_offsets([tp]))[tp]
        start = self.position()
        if start is None:
            start = beginning
        if start > end:
            raise JournalLost(
                f"{tp.topic} ends at {end}, before the position {start} this data dir applied: the"
                " topic was recreated or truncated. Start this core from an empty data dir."
            )
        if start < beginning:  # retention took entries this core never applied
            log.error("journal entries %d..%d vanished unapplied; reading on", start, beginning - 1)
            start = beginning
        seen = self._store.applied_offsets(self._epochs).get(0)
        if seen is not None:
            self._seen = max(self._seen, seen)
        elif beginning < start:
            # A data dir of a version that stored no epoch: the last entry's it read.
            reader.seek(tp, start - 1)
            with contextlib.suppress(ValueError):  # not an entry: skipped as any other reader does
                last = await self._read_one(tp)
                self._seen = max(self._seen, decode(last.value or b"").epoch)
        reader.seek(tp, start)
        self._next.clear()
        while await reader.position(tp) < end:
            fetched = await reader.getmany(tp, timeout_ms=100)
            for record in fetched.get(tp, []):
                await self._replay(record)
        self._end = end

    async def _epochs_between(self, first: int, end: int) -> list[int]:
        """The epochs of the entries at offsets [first, end) (another core's, appended while
        this one believed it led)."""
        assert self._reader is not None
        reader, tp = self._reader, self._partition
        epochs: list[int] = []
        reader.resume(tp)
        reader.seek(tp, first)
        try:
            while await reader.position(tp) < end:
                with contextlib.suppress(ValueError):  # not an entry: no epoch
                    record = await self._read_one(tp)
                    if record.offset < end:
                        epochs.append(decode(record.value or b"").epoch)
        finally:
            reader.pause(tp)
        return epochs

    async def _read_one(self, tp: TopicPartition) -> ConsumerRecord[bytes, bytes]:
        assert self._reader is not None
        async with asyncio.timeout(READ_SECONDS):
            while True:
                fetched = await self._reader.getmany(tp, timeout_ms=100, max_records=1)
                if fetched.get(tp):
                    return fetched[tp][0]

    async def _replay(self, record: ConsumerRecord[bytes, bytes]) -> None:
        assert self._ranges is not None
        self._end = record.offset + 1
        try:
            entry = decode(record.value or b"")
        except ValueError as exc:
            return self._skip(record.offset, str(exc))
        if entry.epoch < self._seen:
            return self._skip(record.offset, f"epoch {entry.epoch} after {self._seen}")
        follower = self._followers.get(entry.topic)
        if follower is None:
            return self._skip(record.offset, f"no follower of {entry.topic}")
        async with asyncio.timeout(READ_SECONDS):
            records = await self._ranges.read(entry.topic, entry.ranges)
        try:
            await follower.replay(entry, records, self._positions(record.offset, entry.epoch))
        except OffsetGap as exc:
            return self._skip(record.offset, str(exc))
        self._seen = entry.epoch
        self._next.update(((entry.topic, p), n) for p, n in entry.next_offsets().items())
        self.replayed += 1

    def _applied(self, epoch: int, job: asyncio.Future[Any]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._seen = max(self._seen, epoch)

    @property
    def _epochs(self) -> str:
        """Where the greatest epoch applied is stored, as a position of its own."""
        return f"{self._kafka.journal_topic}#epoch"

    def _positions(self, offset: int, epoch: int) -> Positions:
        """What a group's job stores: the journal's position after the entry at `offset`, and
        the epoch it applied (never less than the last: older entries are skipped)."""
        return ((self._kafka.journal_topic, 0, offset + 1), (self._epochs, 0, epoch))

    def _skip(self, offset: int, why: str) -> None:
        self.skipped += 1
        log.warning("journal entry %d skipped: %s", offset, why)


class _Ranges:
    """Reads ranges of records, partition by partition, reading on where the last range of a
    partition ended (a catch-up reads each partition's groups in order) and seeking otherwise.
    Offsets may have holes (transaction markers): a range is read once the partition's position
    has passed its end."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self._buffers: dict[TopicPartition, Records] = {}
        self._from: dict[TopicPartition, int] = {}  # records from here on are buffered or next

    def release(self) -> None:
        """Read nothing until the next `read` (between catch-ups)."""
        self.consumer.assign([])
        self._buffers.clear()
        self._from.clear()

    async def read(self, topic: str, ranges: tuple[tuple[int, int, int], ...]) -> Records:
        records: Records = []
        for partition, first, end in ranges:
            records += await self._range(TopicPartition(topic, partition), first, end)
        return records

    async def _range(self, tp: TopicPartition, first: int, end: int) -> Records:
        consumer = self.consumer
        if tp not in consumer.assignment():
            consumer.assign([*consumer.assignment(), tp])  # positions start anew
            self._from.clear()
            self._buffers.clear()
        buffer = self._buffers.setdefault(tp, [])
        if self._from.get(tp, first + 1) > first:
            consumer.seek(tp, first)
            buffer.clear()
        while not (buffer and buffer[-1].offset >= end - 1) and await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=100)
            buffer += fetched.get(tp, [])
        taken = [r for r in buffer if first <= r.offset < end]
        self._buffers[tp] = [r for r in buffer if r.offset >= end]
        self._from[tp] = end
        return taken
