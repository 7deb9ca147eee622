"""Kafka mode's write path: every API write a record on the control topic, applied by the core.

The protocol (each step is named where the code takes it):

1. Append: an API write becomes a record (`meters.commands`), produced to the control topic
   (`<topic>.control`, one partition, keyed by organization), its secrets sealed (`sealed`),
   and its request waits for the outcome (`ControlTopic.append`). Past `answer_seconds` it is
   answered 504 with its request id: the record is logged and will be applied; sent again with
   that id, it answers then.
2. Read: the leader (`leadership`) reads the control topic from the offset stored in its
   database (`control_offsets`; the log's start when none); every other core applies its groups
   from the journal.
3. Apply: a fetch's records are one group: its journal entry is appended (`journal`), then
   one writer job applies them in offset order, each once per request id with its outcome
   stored (`store.apply.commands`). A record that does not decode, or names an organization
   that does not exist, is logged and skipped: it never blocks the topic. Records of
   organizations and tokens are kept in the token registry (`token_records`); those of shard
   splits are applied in the group, as `splits` says.
4. Store the position: the next offset, and the journal's, in the group's transaction. A core
   killed before they are stored applies the group again from the journal: the stored outcomes
   answer, nothing is applied twice. A group that failed for any reason but a rejection (the
   disk, a closing store) is applied again by the journal's catch-up, and the topic read again
   from the stored offset after a pause.
5. Answer: each outcome settles this core's requests waiting with that request id.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from aggregator.errors import OffsetGap, WriteTimeout
from aggregator.intake import token_records
from aggregator.intake.journal import Entry, Journal
from aggregator.intake.leadership import Role, task_while_open, while_leading
from aggregator.intake.sealed import Sealer, Unsealable
from aggregator.intake.splits import KINDS as SPLIT_KINDS
from aggregator.intake.splits import Splits
from aggregator.store import Outcome, Positions, Store, advance_control_job, control_offset
from ingest.kafka import KafkaSettings, ensure_topics, start_producer, starting, stop_within
from ingest.tasks import cancel_within
from meters.commands import Command, decode, encode
from meters.errors import MetersError
from meters.times import now_us

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
MAX_RECORDS = 500  # per fetch: the writes of one fetch are in the writer at once
# The kinds of write records that correct stored events (decision 18): each applied alone.
CORRECTIONS = frozenset({"event.void", "event.amend", "event.replace"})


class ControlTopic:
    """The `CommandLog` of a core in Kafka mode (step 1 and step 5). An async context manager."""

    def __init__(self, kafka: KafkaSettings, sealer: Sealer, answer_seconds: float = 30.0) -> None:
        self._kafka = kafka
        self._sealer = sealer
        self._answer_seconds = answer_seconds
        self._producer: Any = None
        self._waiting: collections.defaultdict[tuple[str, str], list[asyncio.Future[Outcome]]]
        self._waiting = collections.defaultdict(list)
        self.partitions = 0  # the events topic's, once entered (a shard's customers: `routing`)

    async def __aenter__(self) -> Self:
        self.partitions = await ensure_topics(self._kafka)
        async with starting(self._kafka) as retry:
            self._producer = await retry(partial(start_producer, self._kafka, linger_ms=0))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await stop_within(self._producer.stop, self._kafka.stop_timeout_seconds, "producer")

    async def append(self, command: Command) -> Outcome:
        key = (command.organization_id, command.request_id)
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[key].append(answer)
        try:
            async with asyncio.timeout(self._answer_seconds):
                await self._producer.send_and_wait(
                    self._kafka.control_topic,
                    encode(self._sealer.seal(command)),
                    key=command.organization_id.encode(),
                )
                return await answer
        except TimeoutError:
            raise WriteTimeout(command.request_id, self._answer_seconds) from None
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None and answer in waiting:
                waiting.remove(answer)
                if not waiting:
                    del self._waiting[key]

    def read(self, value: bytes) -> Command:
        """A record of the topic as written by `append` (MetersError, Unsealable)."""
        return self._sealer.open(decode(value))

    def settle(self, command: Command, outcome: Outcome) -> None:
        """Step 5."""
        for answer in self._waiting.pop((command.organization_id, command.request_id), []):
            if not answer.done():
                answer.set_result(outcome)


class ControlApplier:
    """Reads the control topic and applies it (steps 2 to 4). An async context manager."""

    def __init__(
        self,
        store: Store,
        kafka: KafkaSettings,
        control: ControlTopic,
        organization_exists: Callable[[str], bool],
        tokens: Callable[[Command], None],
        journal: Journal,
        role: Role,
        splits: Splits,
    ) -> None:
        """`tokens` keeps the records of organizations and tokens (`token_records`); `splits`
        notes the records of shard splits, which are applied with the group (`splits`). While
        another core leads (`role`), this one reads nothing itself: it applies the groups the
        journal names (`replay`)."""
        self._store = store
        self._journal = journal
        self._role = role
        self._kafka = kafka
        self._control = control
        self._organization_exists = organization_exists
        self._tokens = tokens
        self._splits = splits
        self._partition = TopicPartition(kafka.control_topic, 0)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        # The control topic's next offset once every group before it has committed here: a
        # write answered by any core is read here once this has passed its record (`reached`).
        self.through = 0
        self._advanced = asyncio.Event()
        self.applied = 0
        self.skipped = 0

    async def __aenter__(self) -> Self:
        stored = await self._store.read_now(control_offset, self._kafka.control_topic, 0)
        self.through = stored or 0
        self._journal.follow(self._kafka.control_topic, self)
        self._task = asyncio.create_task(
            while_leading(self._role, self._reading), name="control-applier"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._task, what="control applier")

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """Steps 2 to 4 while open (this core leads)."""
        kafka = self._kafka
        self._consumer = kafka.reader(
            # How long a fetch waits for records (Tansu waits it out whatever arrives): what an
            # API write waits for its record once produced. Measured on loopback: 50 ms gave a
            # customer create 27.5 ms (p50), 10 ms 10.5 ms, for 0.024 more cores while idle.
            fetch_max_wait_ms=10,
        )
        try:
            async with starting(kafka) as retry:
                await retry(self._consumer.start)
            self._consumer.assign([self._partition])
            await self._seek_to_stored()
            async with task_while_open("control-reading", self._run, _report_stop):
                yield
        finally:
            await stop_within(self._consumer.stop, kafka.stop_timeout_seconds, "control consumer")
            self._consumer = None

    async def reached(self, offset: int) -> None:
        """Returns once the groups before `offset` have committed here."""
        while self.through < offset:
            await self._advanced.wait()

    def _advance(self, through: int) -> None:
        if through > self.through:
            self.through = through
            self._advanced.set()
            self._advanced = asyncio.Event()

    async def _seek_to_stored(self) -> None:
        """Step 2."""
        assert self._consumer is not None
        stored = await self._store.read_now(control_offset, self._kafka.control_topic, 0)
        if stored is None:
            await self._consumer.seek_to_beginning(self._partition)
        else:
            self._consumer.seek(self._partition, stored)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            fetched = await self._consumer.getmany(timeout_ms=100, max_records=MAX_RECORDS)
            for group in self._groups(fetched.get(self._partition, [])):
                entry = Entry(
                    self._kafka.control_topic,
                    ((0, group[0].offset, group[-1].offset + 1),),
                    now_us(),
                )
                try:
                    await self._journal.append(entry, partial(self._apply, group))
                except asyncio.CancelledError:
                    raise
                except OffsetGap as exc:  # read before a catch-up applied them
                    log.info("re-reading write records from the stored position: %s", exc)
                    await self._seek_to_stored()
                    break
                except Exception:
                    log.exception("applying write records failed; reading them again")
                    await asyncio.sleep(RETRY_SECONDS)
                    await self._seek_to_stored()
                    break

    def _groups(
        self, records: list[ConsumerRecord[bytes, bytes]]
    ) -> list[list[ConsumerRecord[bytes, bytes]]]:
        """Step 3's groups of a fetch: its records in order, a correction in a group of its
        own. A correction costs the writer as much as thousands of other writes (it reads and
        writes files of events and rollups), so a group of many would hold every tenant's
        writes for its whole sum; alone, each is one writer job, as embedded mode applies it."""
        groups: list[list[ConsumerRecord[bytes, bytes]]] = []
        alone = False
        for record in records:
            try:
                correction = self._control.read(record.value or b"").kind in CORRECTIONS
            except (MetersError, Unsealable):
                correction = False  # skipped when applied
            if not groups or correction or alone:
                groups.append([])
            groups[-1].append(record)
            alone = correction
        return groups

    async def replay(
        self, entry: Entry, records: list[ConsumerRecord[bytes, bytes]], positions: Positions
    ) -> None:
        """A journal entry's group (`journal.Follower`)."""
        await self._apply(records, positions)

    def _apply(
        self, records: list[ConsumerRecord[bytes, bytes]], positions: Positions
    ) -> Awaitable[None]:
        """Steps 3 to 5 for one group: its job is queued when this returns (the journal's
        order); the answers once it has committed."""
        commands: list[Command] = []
        after = [advance_control_job(self._kafka.control_topic, 0, records[-1].offset + 1)]
        for record in records:
            try:
                command = self._control.read(record.value or b"")
            except (MetersError, Unsealable) as exc:
                self._skip(record, f"undecodable: {exc}")
                continue
            if command.kind in token_records.KINDS:  # kept, not applied
                self._tokens(command)
                continue
            if command.kind in SPLIT_KINDS:  # no organization's: the deployment's
                try:
                    after.append(self._splits.job(command, self._kafka.topic))
                except (KeyError, TypeError, ValueError) as exc:
                    self._skip(record, f"not a split record: {exc!r}")
                continue
            if not self._organization_exists(command.organization_id):
                self._skip(record, f"unknown organization {command.organization_id}")
                continue
            commands.append(command)
        # Steps 3 and 4: one job, in offset order.
        applying = self._store.queued_commands(commands, after, positions)

        async def answered() -> None:
            outcomes = await applying
            self._advance(records[-1].offset + 1)
            for command, outcome in zip(commands, outcomes, strict=True):
                self._control.settle(command, outcome)  # step 5
                self.applied += 1

        return answered()

    def _skip(self, record: ConsumerRecord[bytes, bytes], why: str) -> None:
        self.skipped += 1
        log.error("control topic offset %d skipped: %s", record.offset, why)


def _report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the control applier stopped; API writes are not applied")
