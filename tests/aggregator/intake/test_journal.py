"""The journal (`aggregator.intake.journal`): entries appended in one order are applied in that
order by a core that catches up from an empty store; stale epochs, entries that are not entries
and groups that do not chain are skipped or refused; a group that failed to apply is applied
again from the journal before the next append. Two cores that both believe they lead (one
paused past its lease) apply one order: an entry that lands after another core's is not
applied until its core has caught up, and a core that follows applies the leader's entries as
they come, then leads from there."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from aggregator.errors import JournalLost, NotLeading, OffsetGap
from aggregator.intake.journal import Entry, Journal, Records, decode, encode
from aggregator.intake.leadership import Role
from aggregator.store import Positions, Store
from ingest.kafka import KafkaSettings
from tests.deadline import until
from tests.processes import Broker

pytestmark = pytest.mark.slow


def test_an_entry_reads_back_as_written_and_nothing_else_reads_as_one() -> None:
    entry = Entry("t", ((2, 5, 9), (0, 1, 3)), 1_700_000_000_000_000, 4, ((2, 6, None), (0, 1, 3)))
    assert decode(encode(entry)) == entry
    step = Entry("backfill", (), 1_700_000_000_000_000, 2, backfill=("m", 3, 20_000))
    assert decode(encode(step)) == step
    cycles = Entry("plans", (), 1_700_000_000_000_000, 2, cycles=100)
    assert decode(encode(cycles)) == cycles
    # A side effect's change comes back with its arguments as JSON gives them (no tuples).
    change = ("raw.quarantine", ("org", [[5, "refused"]], 1_700_000_000_000_000))
    effect = Entry("effects", (), 1_700_000_000_000_000, 2, effect=change)
    assert decode(encode(effect)) == effect
    for value in (b"{}", b'{"v": 2}', b'{"v": 1, "topic": "t"}', b"[]"):
        with pytest.raises(ValueError, match="journal entry"):
            decode(value)


@dataclass
class Recorder:
    """A follower (`journal.Follower`) that stores each group's position and notes what it
    was given; `fail` makes the next group's job fail once."""

    store: Store
    seen: list[tuple[tuple[tuple[int, int, int], ...], list[int], int]] = field(
        default_factory=list
    )
    fail: bool = False

    def queue(self, entry: Entry, records: Records, positions: Positions) -> Any:
        expected = self.store.applied_offsets("meterline.events").get(0)
        first = entry.ranges[0][1]
        if expected is not None and first != expected:
            raise OffsetGap(f"starts at {first}, applied {expected}")
        failing, self.fail = self.fail, False

        def job(tx: Any) -> None:
            if failing:
                raise OSError("the disk")
            ranges = tuple(("meterline.events", p, n) for p, _, n in entry.ranges)
            tx.live.advance(tx.con, ranges + positions)

        self.seen.append((entry.ranges, [r.offset for r in records], entry.epoch))
        return self.store.queued(job)

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        await self.queue(entry, records, positions)


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


@pytest.mark.processes
def test_a_core_from_an_empty_store_applies_the_journal_in_its_order(tmp_path: Path) -> None:
    with Broker() as broker:
        asyncio.run(
            _scenario(tmp_path, KafkaSettings(broker.bootstrap, partitions=1, idempotence=False))
        )


async def _scenario(tmp_path: Path, kafka: KafkaSettings) -> None:
    async with (
        Store(tmp_path / "first.duckdb") as store,
        Journal(store, kafka, Role(True)) as journal,
    ):
        first = Recorder(store)
        journal.follow(kafka.topic, first)
        await journal.start()
        assert journal.epoch == 1
        await _produce(kafka.bootstrap, kafka.topic, [b"a", b"b", b"c", b"d", b"e"])

        def group(first_offset: int, end: int) -> Entry:
            return Entry(kafka.topic, ((0, first_offset, end),), 1_000 + first_offset)

        async def append(entry: Entry) -> None:
            await journal.append(entry, lambda positions: first.queue(entry, [], positions))

        await append(group(0, 2))
        # A group that does not start where the last one ended is refused before it is appended
        # (and the next append catches up first: a new epoch).
        with pytest.raises(OffsetGap):
            await append(group(3, 4))
        # A group whose job fails: appended, not applied; the next append applies it first.
        first.fail = True
        with pytest.raises(OSError, match="the disk"):
            await append(group(2, 3))
        assert journal.position() == 1
        await append(group(3, 5))
        assert [ranges for ranges, _, _ in first.seen] == [
            ((0, 0, 2),),
            ((0, 2, 3),),
            ((0, 2, 3),),  # again, from the journal
            ((0, 3, 5),),
        ]
        assert journal.position() == 3  # three entries applied
        assert journal.epoch == 3  # each catch-up draws a new epoch

    # Not entries, and an entry of an older epoch (a writer replaced since): skipped by all.
    stale = encode(Entry(kafka.topic, ((0, 5, 6),), 9, epoch=1))
    await _produce(kafka.bootstrap, kafka.journal_topic, [b"not an entry", stale])

    async with (
        Store(tmp_path / "second.duckdb") as store,
        Journal(store, kafka, Role(True)) as journal,
    ):
        second = Recorder(store)
        journal.follow(kafka.topic, second)
        await journal.start()
        assert second.seen == [
            (((0, 0, 2),), [0, 1], 1),
            (((0, 2, 3),), [2], 2),
            (((0, 3, 5),), [3, 4], 3),
        ]
        assert journal.position() == 3  # what is skipped is read again by the next catch-up
        assert (journal.replayed, journal.skipped) == (3, 2)
        assert journal.epoch == 4

    # A data dir that applied more of the journal than the topic holds (recreated): refused.
    async with (
        Store(tmp_path / "third.duckdb") as store,
        Journal(store, kafka, Role(True)) as journal,
    ):
        await store.queued(_advance(((kafka.journal_topic, 0, 100),)))
        with pytest.raises(JournalLost, match="recreated or truncated"):
            await journal.start()


@pytest.mark.processes
def test_two_cores_that_both_lead_apply_one_order(tmp_path: Path) -> None:
    with Broker() as broker:
        kafka = KafkaSettings(broker.bootstrap, partitions=1, idempotence=False)
        asyncio.run(_two_leaders(tmp_path, kafka))


async def _two_leaders(tmp_path: Path, kafka: KafkaSettings) -> None:
    roles = (Role(True), Role(True))
    async with (
        Store(tmp_path / "a.duckdb") as a_store,
        Journal(a_store, kafka, roles[0]) as a,
        Store(tmp_path / "b.duckdb") as b_store,
        Journal(b_store, kafka, roles[1]) as b,
    ):
        recorders = (Recorder(a_store), Recorder(b_store))
        for journal, recorder in zip((a, b), recorders, strict=True):
            journal.follow(kafka.topic, recorder)
            await journal.start()
        await _produce(kafka.bootstrap, kafka.topic, [b"a", b"b", b"c", b"d"])

        async def append(journal: Journal, recorder: Recorder, first: int, end: int) -> None:
            entry = Entry(kafka.topic, ((0, first, end),), 1_000 + first)
            await journal.append(entry, lambda positions: recorder.queue(entry, [], positions))

        await append(a, recorders[0], 0, 2)
        # b read the same records and appends them too: its entry lands after a's, so b
        # applies nothing, and catches up before its next append (a's entry, then its own,
        # refused by the store as every core refuses it), drawing a later epoch.
        with pytest.raises(OffsetGap, match="after another core's"):
            await append(b, recorders[1], 0, 2)
        assert recorders[1].seen == [] and roles[1].leading  # the same epoch as a's: it leads
        with pytest.raises(OffsetGap):  # read before the catch-up: read again
            await append(b, recorders[1], 0, 2)
        await append(b, recorders[1], 2, 3)
        assert b.epoch > a.epoch
        # a's next entry lands after b's, of a later epoch: a steps down...
        with pytest.raises(OffsetGap, match="after another core's"):
            await append(a, recorders[0], 2, 3)
        assert not roles[0].leading
        # b's next entry lands after a's (skipped by all: an older epoch after a later one),
        # and is applied by the catch-up before b's next append.
        with pytest.raises(OffsetGap, match="after another core's"):
            await append(b, recorders[1], 3, 4)
        with pytest.raises(OffsetGap):
            await append(b, recorders[1], 3, 4)
        # ... and follows: it applies b's entries as they come, and never appends.
        await until("b to reach a's position", lambda: a.position() == b.position())
        with pytest.raises(NotLeading):
            await append(a, recorders[0], 4, 4)
        # Leading again (the lease moved), a catches up first: its entries count (below).
        roles[1].set(False)
        roles[0].set(True)
        await _produce(kafka.bootstrap, kafka.topic, [b"e"])
        await append(a, recorders[0], 4, 5)
        applied = [ranges for ranges, _, _ in recorders[0].seen]
        await until("a to reach b's position", lambda: b.position() == a.position())
        assert [ranges for ranges, _, _ in recorders[1].seen] == applied
    # One order: a third core from an empty store applies what each of them applied.
    async with Store(tmp_path / "c.duckdb") as store, Journal(store, kafka, Role(False)) as c:
        third = Recorder(store)
        c.follow(kafka.topic, third)
        await c.start()
        assert [ranges for ranges, _, _ in third.seen] == applied
        assert applied == [((0, 0, 2),), ((0, 2, 3),), ((0, 3, 4),), ((0, 4, 5),)]


@pytest.mark.processes
def test_a_data_dir_that_stored_no_epoch_skips_as_the_others_do(tmp_path: Path) -> None:
    """The previous main stored the journal's position, not the greatest epoch applied: such a
    data dir takes the epoch of the last entry it read, and skips an older one after it."""
    with Broker() as broker:
        kafka = KafkaSettings(broker.bootstrap, partitions=1, idempotence=False)
        asyncio.run(_without_epoch(tmp_path, kafka))


async def _without_epoch(tmp_path: Path, kafka: KafkaSettings) -> None:
    await _produce(kafka.bootstrap, kafka.topic, [b"a", b"b"])
    entries = [Entry(kafka.topic, ((0, 0, 1),), 1, epoch=1), Entry(kafka.topic, ((0, 1, 2),), 2, 3)]
    stale = Entry(kafka.topic, ((0, 2, 2),), 3, epoch=2)
    await _produce(kafka.bootstrap, kafka.journal_topic, [encode(e) for e in (*entries, stale)])
    async with Store(tmp_path / "old.duckdb") as store:
        # As the previous main left it: both entries applied, their position stored alone.
        await store.queued(_advance(((kafka.topic, 0, 2), (kafka.journal_topic, 0, 2))))
    async with (
        Store(tmp_path / "old.duckdb") as store,
        Journal(store, kafka, Role(False)) as journal,
    ):
        recorder = Recorder(store)
        journal.follow(kafka.topic, recorder)
        await journal.start()
        assert (recorder.seen, journal.skipped, journal.epoch) == ([], 1, 3)


def _advance(positions: Positions) -> Any:
    def job(tx: Any) -> None:
        tx.live.advance(tx.con, positions)

    return job
