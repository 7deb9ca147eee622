"""The consumer core: applies the events topic to the store, exactly once in effect.

The checkpoint protocol. The offsets stored in DuckDB are the only truth about what has been
applied; the code below names each step where it takes it.

1. Assign: while this core leads (`leadership`), it reads its shard's partitions (every one
   without `--shard`), outside any consumer group. For each partition read its stored offset;
   one with none first stores its log's start (`StartOffsets`), so that a batch from any other
   position is refused. Seek there.
   (`_reading`, `seek_to_stored`)
2. Check the log: at assignment, about once a second, and whenever the broker refuses a
   position, a stored offset outside the log's [start, end] (the topic recreated, a broker that
   lost its log, retention that deleted unread records) would skip every record up to it; such
   a partition resumes from the log's start, recorded and logged loudly (`OffsetReset`).
   (`_check_log`)
3. Fetch and decode a batch (in the decoding thread). Records that cannot be applied
   (undecodable, or naming an organization or customer that does not exist) are sent to the
   dead-letter topic, with the reason and their origin in headers, and acknowledged before
   anything else: a partition is never blocked, and a crash after this step repeats the dead
   letter (at least once), never loses it. A shard of several then moves the rows whose
   customer another shard holds to it the same way (`routing`). (`_prepare`, `_dead_letter`)
4. Apply: the batch's entry (its ranges, dead rows and time) is appended to the journal, and
   one writer job (`ConsumedBatch`) applies the batch in memory and commits, in the journal's
   order (`journal`); the journal and the job refuse a batch that does not start where the
   applied offsets end (`OffsetGap`). The next batch is fetched and decoded (step 3) while this
   one commits. (`_commit`; other cores apply the entry through `replay`)
5. Store: the flusher stores applied events with their partitions' next offsets and the
   journal's position in one DuckDB transaction (`memtable.store`). This is the checkpoint:
   after a crash, step 1 resumes from it, and events applied in memory but not yet stored are
   read again.
6. Lag: the records not yet applied per partition are on `/metrics` (`lag`); no group offset
   is committed (the core's consumer group holds the lease).
7. On a failure in step 3 or 4: settle the batch in flight, seek back to the stored offsets
   (step 1) and read again. Nothing after the last committed batch counts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from types import TracebackType
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord

from aggregator.errors import CutUnknown, OffsetGap, UsageError
from aggregator.intake.dead_letters import HEADERS, organization_of
from aggregator.intake.decode import DeadLetter, dead_rows, decode_batch
from aggregator.intake.journal import Entry, Journal
from aggregator.intake.leadership import Role, task_while_open, while_leading
from aggregator.intake.routing import Router, carried, foreign
from aggregator.intake.splits import WAIT_SECONDS, Splits
from aggregator.store import (
    ORIGIN,
    ConsumedBatch,
    OffsetReset,
    Positions,
    Prepared,
    Reset,
    StartOffsets,
    Store,
    missing_customers,
    offset_resets,
    shard_splits,
    stored_offsets,
    with_source,
)
from ingest.kafka import KafkaSettings, ensure_topics, start_producer, starting, stop_within
from ingest.tasks import cancel_within
from meters.columnar import H_ORGANIZATION
from meters.events import EventRules
from meters.times import now_us

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    # Events per poll, i.e. per transaction at most; fewer when that many would hold the
    # writer past its job bound (measured from the batches committed so far). Polls ask for
    # records: a columnar record holds many events, so the events per record seen so far
    # convert one into the other, starting from `first_records`.
    max_events: int = 20_000
    min_events: int = 500
    first_records: int = 16
    poll_timeout_ms: int = 50
    max_record_bytes: int = 1024 * 1024
    retry_seconds: float = 1.0  # after a failed batch, before reading it again
    # How often the log's range is compared with the stored offsets. A log recreated and
    # refilled past the stored offset between two checks is not noticed (the broker refuses
    # nothing); a real Kafka broker refuses the position sooner.
    log_check_seconds: float = 1.0


# Latest dead-letter reasons kept per organization (memory is bounded by the organizations).
REASONS_KEPT = 5


@dataclass(slots=True)
class OrganizationCounts:
    """One organization's records since the core started: events handed to the writer
    (`applied`: duplicates of stored events included, they change nothing) and dead letters,
    with the latest reasons as (time in ms, reason), newest last."""

    applied: int = 0
    dead_lettered: int = 0
    reasons: collections.deque[tuple[int, str]] = field(
        default_factory=lambda: collections.deque(maxlen=REASONS_KEPT)
    )


class Consumer:
    """Runs in the background while open. An async context manager."""

    def __init__(
        self,
        store: Store,
        kafka: KafkaSettings,
        rules: EventRules,
        organization_exists: Callable[[str], bool],
        journal: Journal,
        role: Role,
        splits: Splits,
        settings: ConsumerSettings | None = None,
    ) -> None:
        """While another core leads (`role`), this one reads no partition: it applies the
        groups the journal names (`replay`), as the core that appended them read them."""
        self._store = store
        self._journal = journal
        self._role = role
        self._splits = splits
        # Decoding is Arrow, zstd and DuckDB, mostly outside the GIL: a thread of its own, at
        # niceness +10 like the validation workers, so that on a shared machine the edges and
        # the writer go first (measured: un-niced, the core took the CPU an edge beside it
        # needed, and 50,000 events/s offered became ~38,000 accepted), without the worker
        # process's pickling and hop.
        self._decoder = ThreadPoolExecutor(1, "kafka-decode", initializer=_lower_priority)
        self._kafka = kafka
        self._rules = rules
        self._organization_exists = organization_exists
        self._settings = settings or ConsumerSettings()
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[int] = []  # this shard's, of the topic's (step 1)
        self._router: Router | None = None  # a shard of several moves rows (`routing`)
        self.moved = 0
        self._dead_letters: Any = None
        self._task: asyncio.Task[None] | None = None
        self._records = self._settings.first_records
        self._events = self._settings.min_events  # the target per poll
        self.applied = 0
        self.dead_lettered = 0
        # Per existing organization; dead letters naming none (or an unknown one) under "".
        self.organizations: collections.defaultdict[str, OrganizationCounts] = (
            collections.defaultdict(OrganizationCounts)
        )
        self.commit_seconds: collections.deque[float] = collections.deque(maxlen=1000)

    @property
    def router(self) -> Router | None:
        """Where this shard's rows and customers belong (a shard of several, once entered)."""
        return self._router

    async def __aenter__(self) -> Self:
        shard, count = self._kafka.shard, await ensure_topics(self._kafka)
        if shard.count > count:
            raise UsageError(
                f"shard {shard}: the topic {self._kafka.topic} has {count} partitions, so at"
                f" most {count} shards; re-partition it for more (docs: replicas and shards)"
            )
        self._partitions = shard.partitions(count)
        self._router = Router(self._store, self._kafka, count) if shard.count > 1 else None
        # A data dir holds the state of the partitions it applied: started as another shard,
        # it would mix two shards' events (or serve partitions it no longer owns).
        held = set(await self._store.read(stored_offsets, self._kafka.topic))
        if not held <= set(self._partitions):
            raise UsageError(
                f"this data dir holds partitions {', '.join(map(str, sorted(held)))} of"
                f" {self._kafka.topic}, not all of shard {shard}'s"
                f" ({', '.join(map(str, self._partitions))}): start it as the shard it was,"
                " or start this shard on a new data dir"
            )
        self._splits.refuse_retired(await self._store.read(stored_offsets, self._kafka.topic))
        self._journal.follow(self._kafka.topic, self)
        self._task = asyncio.create_task(
            while_leading(self._role, self._reading), name="kafka-consumer"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._task, what="consumer")
        self._decoder.shutdown(wait=True, cancel_futures=True)

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """Steps 1 to 7 while open (this core leads)."""
        kafka = self._kafka
        consumer = kafka.reader(
            # Positions always come from the store; one the log lacks is an error to handle
            # (`_check_log`), never a silent jump.
            auto_offset_reset="none",
            fetch_max_wait_ms=self._settings.poll_timeout_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        dead_letters = None
        self._consumer = consumer
        try:
            async with starting(kafka) as retry:
                await retry(consumer.start)
                dead_letters = await retry(partial(start_producer, kafka, linger_ms=0))
            self._dead_letters = dead_letters
            partitions = [TopicPartition(kafka.topic, p) for p in self._partitions]
            consumer.assign(partitions)
            await self.seek_to_stored(partitions)
            async with task_while_open("kafka-reading", self._run, _report_stop):
                yield
        finally:
            bound = kafka.stop_timeout_seconds
            await stop_within(consumer.stop, bound, "consumer")
            if dead_letters is not None:
                await stop_within(dead_letters.stop, bound, "dead-letter producer")
            self._consumer = self._dead_letters = None

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

    async def offset_resets(self) -> list[Reset]:
        """Every time a partition resumed from its log's start (see `_check_log`)."""
        return await self._store.read_now(offset_resets, self._kafka.topic)

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        # Pipelined: batch N+1 is fetched and decoded while batch N commits (DuckDB's writer
        # works outside the GIL). If N fails, N+1 is dropped and both are read again.
        writing: asyncio.Task[None] | None = None
        checked_at = time.monotonic()
        while True:
            refused: dict[TopicPartition, int] = {}
            try:
                fetched = await consumer.getmany(
                    timeout_ms=self._settings.poll_timeout_ms, max_records=self._records
                )
            except OffsetOutOfRangeError as exc:
                fetched, refused = {}, exc.args[0]
            except NoOffsetForPartitionError:
                # Fetched before the assignment's seek landed: seek now (step 1).
                await self.seek_to_stored(consumer.assignment())
                continue
            if self._splits.retiring:  # its partitions are cut (`splits`, step 3)
                fetched, refused, checked_at = {}, {}, time.monotonic()
            # Step 2, after the batch in flight has settled the stored offsets.
            if refused or time.monotonic() - checked_at >= self._settings.log_check_seconds:
                if writing is not None:  # settle the stored offsets first
                    failed = (await asyncio.gather(writing, return_exceptions=True))[0]
                    writing = None
                    if isinstance(failed, Exception):
                        log.error(
                            "applying a batch failed; retrying from the stored offsets: %r", failed
                        )
                        await self.seek_to_stored(consumer.assignment())
                        continue
                await self._check_log(refused)
                checked_at = time.monotonic()
                if refused:
                    continue
            try:
                batch = await self._prepare(fetched) if fetched else None  # step 3
                if writing is not None:
                    await writing
                    writing = None
                if batch is not None:
                    writing = asyncio.create_task(self._commit(batch, fetched))  # step 4
            except asyncio.CancelledError:
                # Stopping: the batch in flight commits or fails in the writer either way;
                # wait for it (bounded) so that the store closes after it.
                if writing is not None:
                    await asyncio.wait([writing], timeout=self._kafka.stop_timeout_seconds)
                raise
            except (OffsetGap, CutUnknown) as exc:
                # Step 7. Records fetched before a seek landed (at assignment, or after a
                # failure), or moved rows whose cut is not known yet (`splits`, step 4):
                # nothing was written; read on from the stored offsets.
                log.info("re-reading from the stored offsets: %s", exc)
                await _settled(writing)
                writing = None
                if isinstance(exc, CutUnknown):
                    await asyncio.sleep(WAIT_SECONDS)
                await self.seek_to_stored(consumer.assignment())
            except Exception:
                # Step 7: nothing after the last committed batch counts; read again from there.
                log.exception("applying a batch failed; retrying from the stored offsets")
                await _settled(writing)
                writing = None
                await asyncio.sleep(self._settings.retry_seconds)
                await self.seek_to_stored(consumer.assignment())

    async def seek_to_stored(self, partitions: Sequence[TopicPartition] | set[Any]) -> None:
        """Step 1, then step 2."""
        assert self._consumer is not None
        topic = self._kafka.topic
        stored = await self._store.read(stored_offsets, topic)
        missing = [tp for tp in partitions if tp.partition not in stored]
        if missing:
            starts = await self._consumer.beginning_offsets(missing)
            job = StartOffsets(topic, {tp.partition: o for tp, o in starts.items()})
            stored.update(await self._store.write(job))
        for tp in partitions:
            self._consumer.seek(tp, stored[tp.partition])
        await self._check_log()

    async def _check_log(self, refused: Collection[TopicPartition] = ()) -> None:
        """Resume from the log's start every assigned partition whose stored offset is outside
        the log's [start, end], or whose position the broker refused (`refused`: the log
        changed under it, even if it has grown past the stored offset since)."""
        assert self._consumer is not None
        consumer = self._consumer
        partitions = list(consumer.assignment())
        if not partitions:
            return
        stored = self._store.applied_offsets(self._kafka.topic)
        try:
            starts = await consumer.beginning_offsets(partitions)
            ends = await consumer.end_offsets(partitions)
        except Exception as exc:  # noqa: BLE001 - a topic being recreated: check again later
            log.warning("could not list the log's offsets: %r", exc)
            return
        for tp in partitions:
            offset, start, end = stored.get(tp.partition), starts[tp], ends[tp]
            if offset is None:
                if tp in refused:  # nothing applied yet: read whatever the log holds
                    consumer.seek(tp, start)
                continue
            # The log's end: some brokers list the first offset of the last batch plus one
            # (Tansu); the last fetch's high watermark is right. Past the end only once a
            # fetch has said so.
            high = consumer.highwater(tp)
            if high is None and offset > end and tp not in refused:
                continue
            end = max(end, high or 0)
            if start <= offset <= end and tp not in refused:
                continue
            vanished = start - offset if offset < start else None
            reset = Reset(tp.topic, tp.partition, offset, start, end, vanished, now_us())
            resets = ((tp.partition, offset, start, end, vanished),)
            entry = Entry(tp.topic, (), reset.at_us, resets=resets)
            done = await self._journal.append(entry, partial(self._queue_reset, reset))
            if done is None:
                continue  # a batch moved the offset meanwhile: the next check decides
            log.error(
                "%s[%d]: the log no longer holds the stored offset %d (log: [%d, %d]); it was"
                " truncated or recreated. Resuming from %d; %s",
                tp.topic,
                tp.partition,
                offset,
                start,
                end,
                start,
                f"offsets {offset}..{start - 1} vanished unapplied ({vanished})"
                if vanished
                else "records the old log held past the stored offset, if any, are lost",
            )
            consumer.seek(tp, start)

    def _queue_reset(self, reset: Reset, positions: Positions) -> Awaitable[Reset | None]:
        if self._splits.retiring:  # `splits`, step 3: cut where the split found them
            return self._store.queued_at(shard_splits.past_cut_job(), positions)
        return self._store.queued(OffsetReset(reset, positions))

    def _queue_batch(self, batch: ConsumedBatch, positions: Positions) -> Awaitable[int | None]:
        if self._splits.retiring:  # `splits`, step 3: read before the split, applied after
            return self._store.queued_at(shard_splits.past_cut_job(), positions)
        weight = max(1, batch.events.num_rows)
        return self._store.queued(replace(batch, positions=positions), weight)

    async def _prepare(
        self, fetched: dict[TopicPartition, list[ConsumerRecord]]
    ) -> tuple[ConsumedBatch, Entry]:
        """Decode (in the decoding thread), dead-letter what cannot be applied, and build the
        writer job and its journal entry; nothing is committed yet."""
        records = [r for batch in fetched.values() for r in batch]
        read_at_us = now_us()
        table, dead = await self._decoded(records, read_at_us)
        # Rows left out of the batch: other deployments' moved records, and rows moved away.
        skipped = foreign(records, self._kafka.shard, self._splits.moved_rows)
        left_out: list[tuple[int, int, int | None]] = [
            (records[i].partition, records[i].offset, row) for i, row in skipped
        ]
        if skipped:
            table = _without(table, records, tuple(left_out))
        table, more = await self._known_only(table)
        dead += more
        if dead:
            await self._dead_letter([(records[d.position], d) for d in dead])
        self.dead_lettered += len(dead)
        if self._router is not None and table.num_rows:
            table, moved, moving = await self._router.split(table, records)
            if moved:
                await self._router.move(self._dead_letters, moved)
                self.moved += len(moving)
                left_out += moving
        offsets = {
            tp.partition: (batch[0].offset, batch[-1].offset + 1) for tp, batch in fetched.items()
        }
        entry = Entry(
            self._kafka.topic,
            tuple((p, first, end) for p, (first, end) in offsets.items()),
            read_at_us,
            dead=(
                *((records[d.position].partition, records[d.position].offset, d.row) for d in dead),
                *left_out,
            ),
        )
        return await self._batch(table, records, offsets, read_at_us), entry

    async def _decoded(
        self, records: list[ConsumerRecord], at_us: int, check_rows: bool = True
    ) -> tuple[pa.Table, list[DeadLetter]]:
        return await asyncio.get_running_loop().run_in_executor(
            self._decoder,
            partial(
                decode_batch,
                [r.value for r in records],
                [r.timestamp for r in records],
                [list(r.headers) for r in records],
                at_us,
                self._rules,
                self._settings.max_record_bytes,
                check_rows,
            ),
        )

    async def _batch(
        self,
        table: pa.Table,
        records: list[ConsumerRecord],
        offsets: dict[int, tuple[int, int]],
        at_us: int,
    ) -> ConsumedBatch:
        events = _with_origin(table, records, self._router is not None)
        evaluated = await self._evaluated(events)
        return ConsumedBatch(self._kafka.topic, events, offsets, at_us, evaluated)

    async def replay(
        self, entry: Entry, records: list[ConsumerRecord], positions: Positions
    ) -> None:
        """A journal entry's group (`Follower`): its records decoded at its time, less the rows
        its core dead-lettered (sent then, not again); or the partitions it resumes from their
        log's start. The rows of columnar records are not checked again: the entry names
        every row its core's checks (step 3) left out, and leaving out the same rows is what
        keeps this core's state equal to that one's."""
        for partition, stored, start, end, vanished in entry.resets:
            reset = Reset(entry.topic, partition, stored, start, end, vanished, entry.at_us)
            await self._queue_reset(reset, positions)
        if not entry.ranges:
            return
        table, _ = await self._decoded(records, entry.at_us, check_rows=False)
        if entry.dead:
            table = _without(table, records, entry.dead)
        offsets = {p: (first, end) for p, first, end in entry.ranges}
        batch = await self._batch(table, records, offsets, entry.at_us)
        await self._queue_batch(batch, positions)

    async def _evaluated(self, events: pa.Table) -> dict[str, Prepared]:
        """Each organization's events evaluated for its meters before the writer takes them,
        while the batch before commits."""
        origin = with_source(events)
        organizations = list(map(str, pc.unique(events.column("organization_id")).to_pylist()))
        prepared = await asyncio.gather(*(self._store.prepare(o, origin) for o in organizations))
        return {o: p for o, p in zip(organizations, prepared, strict=True) if p is not None}

    async def _known_only(self, table: pa.Table) -> tuple[pa.Table, list[DeadLetter]]:
        """The rows whose organization exists and whose customer_id, if any, names one of its
        customers (Polar's rule); and the others, as dead letters."""
        organizations = table.column("organization_id")
        unknown = [
            o for o in pc.unique(organizations).to_pylist() if not self._organization_exists(str(o))
        ]
        bad = pc.is_in(organizations, value_set=pa.array(unknown, pa.string()))
        reasons = pc.if_else(bad, "organization_id: no such organization", None)
        # Most events name an external customer id: no row in Python unless one names an id.
        column = table.column("customer_id")
        customers = column.to_pylist() if column.null_count < table.num_rows else []
        if any(customers):
            rows = list(zip(organizations.to_pylist(), customers, strict=True))
            missing = await self._store.read_now(missing_customers, rows)
            reasons = pc.if_else(
                pc.and_(pa.array(missing), pc.invert(bad)),
                "customer_id: Customer not found.",
                reasons,
            )
        dead: pa.BooleanArray = pc.is_valid(reasons)  # type: ignore[assignment]
        if not pc.any(dead).as_py():
            return table, []
        return table.filter(pc.invert(dead)), dead_rows(table.filter(dead), reasons.filter(dead))

    async def _commit(
        self,
        prepared: tuple[ConsumedBatch, Entry],
        fetched: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        batch, entry = prepared
        started = time.perf_counter()
        await self._journal.append(entry, partial(self._queue_batch, batch))
        seconds = time.perf_counter() - started
        self.commit_seconds.append(seconds)
        self._fit_to_bound(sum(len(r) for r in fetched.values()), batch.events.num_rows, seconds)
        self.applied += batch.events.num_rows
        # Per batch, not per row: a few organizations per batch at most.
        per = pc.value_counts(batch.events.column("organization_id"))
        for organization, count in zip(
            per.field("values").to_pylist(), per.field("counts").to_pylist(), strict=True
        ):
            self.organizations[str(organization)].applied += int(count or 0)

    def _fit_to_bound(self, records: int, events: int, seconds: float) -> None:
        """Size the next polls so that a batch's commit fits in the writer's job bound."""
        settings = self._settings
        per_record = max(1.0, events / max(1, records))
        if events >= settings.min_events:  # a small batch is mostly fixed cost: it says little
            fits = int(events * self._store.writer.job_bound_seconds / max(seconds, 1e-3))
            self._events = max(settings.min_events, min(settings.max_events, fits))
        # At most doubling from one poll to the next.
        self._records = max(1, min(int(self._events / per_record), 2 * self._records))

    async def _dead_letter(self, dead: list[tuple[ConsumerRecord, DeadLetter]]) -> None:
        """Step 3's dead letters, acknowledged within `send_timeout_seconds`; past it the
        batch is read again (step 7)."""
        sent: list[tuple[ConsumerRecord, bytes | None, str]] = []
        async with asyncio.timeout(self._kafka.send_timeout_seconds):
            acks = []
            for record, letter in dead:
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                if letter.row is not None:
                    where += f" row {letter.row}"
                log.warning("dead-lettering %s: %s", where, letter.reason)
                headers = [
                    ("meterline.reason", letter.reason.encode()),
                    ("meterline.topic", record.topic.encode()),
                    ("meterline.partition", str(record.partition).encode()),
                    ("meterline.offset", str(record.offset).encode()),
                ]
                if letter.row is not None:
                    headers.append(("meterline.row", str(letter.row).encode()))
                value = record.value if letter.value is None else letter.value
                sent.append((record, value, letter.reason))
                acks.append(
                    await self._dead_letters.send(
                        self._kafka.dead_letter_topic,
                        value=value,
                        key=record.key,
                        headers=headers if letter.row is not None else headers + _origin(record),
                    )
                )
            await asyncio.gather(*acks)
        for record, value, reason in sent:  # once acknowledged: a batch read again recounts
            self._count_dead(record, value, reason)

    def _count_dead(self, record: ConsumerRecord, value: bytes | None, reason: str) -> None:
        """Dead letters are few: counted one by one, under the organization the dead-letter
        reader would show them to (an unknown one is no label: garbage must not add any)."""
        claimed = organization_of(record.key, value, dict(record.headers).get(H_ORGANIZATION))
        owner = claimed if claimed is not None and self._organization_exists(claimed) else ""
        counts = self.organizations[owner]
        counts.dead_lettered += 1
        counts.reasons.append((now_us() // 1000, reason))


def _origin(record: ConsumerRecord) -> list[tuple[str, bytes]]:
    """A whole record's own headers (a columnar record's say its format), kept beside ours."""
    return [(name, value) for name, value in record.headers if name not in HEADERS]


def _lower_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 10)  # on Linux, this thread only


def _with_origin(table: pa.Table, records: list[ConsumerRecord[Any, Any]], moved: bool) -> pa.Table:
    """The decoded events, with the partition, offset and row each was read from in place of
    their position in the fetch (the origin their ids are derived from: `ids.ORIGIN`); for
    a record another shard `moved` here, where it read them (`routing.carried`)."""
    positions = table.column("position").to_numpy()
    partitions = np.fromiter((r.partition for r in records), np.int32, len(records))[positions]
    offsets = np.fromiter((r.offset for r in records), np.int64, len(records))[positions]
    # A JSON record is one event: row 0.
    rows = np.nan_to_num(table.column("row").to_numpy(zero_copy_only=False)).astype(np.int32)
    carried_here = np.zeros(len(positions), dtype=bool)
    for i, origins in enumerate(map(carried, records) if moved else ()):
        if origins is None:
            continue
        at = np.flatnonzero(positions == i)
        which = rows[at]
        if len(at) and int(which.max()) < len(origins[0]):
            partitions[at], offsets[at], rows[at] = (o[which] for o in origins)
            carried_here[at] = True
    table = table.drop_columns(["position", "row"])
    for column, values in zip(ORIGIN, (partitions, offsets, rows, carried_here), strict=True):
        table = table.append_column(column, pa.array(values, column.type))
    return table


def _without(
    table: pa.Table, records: list[ConsumerRecord], dead: tuple[tuple[int, int, int | None], ...]
) -> pa.Table:
    """`table` (decoded from `records`, with their positions) less the `dead` rows: (partition,
    offset, row; None for every row of the record)."""
    rows, whole = set(dead), {(p, o) for p, o, r in dead if r is None}
    where = [(r.partition, r.offset) for r in records]
    positions: list[Any] = table.column("position").to_pylist()
    in_record: list[int | None] = table.column("row").to_pylist()
    keep = [
        where[i] not in whole and (*where[i], row or 0) not in rows
        for i, row in zip(positions, in_record, strict=True)
    ]
    return table.filter(pa.array(keep, pa.bool_()))


def _report_stop(task: asyncio.Task[None]) -> None:
    """The consumer only stops when cancelled; anything else would stop metering silently."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("the Kafka consumer stopped; no events are applied", exc_info=task.exception())


async def _settled(writing: asyncio.Task[None] | None) -> None:
    """Wait for a batch in flight to commit or fail (step 7 reads again after it either way)."""
    if writing is not None:
        await asyncio.gather(writing, return_exceptions=True)
