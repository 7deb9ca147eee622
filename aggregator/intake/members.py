"""Who serves: every core announces itself on the lease topic, and hears the others.

The protocol:

1. Every core in Kafka mode (replicas too) produces a heartbeat to `<topic>.lease` every
   `HEARTBEAT_SECONDS`, and at once when it starts or stops leading: its id (drawn at start),
   URL, role (leader, standby or replica), its shard (`I/N`), the offset it has applied of its
   shard's journal and its epoch. (`_announce`)
2. Every core reads the lease topic outside any group, from `LOOKBACK` records before its end
   on, keeping each core's latest heartbeat and where it was read; what is not a heartbeat is
   passed over. (`_hear`)
3. `GET /v1/cluster/` lists the cores heard within `FORGET_SECONDS`, newest first: alive when
   heard within three heartbeats (and not stopped); this core as it is now. Asked, it first
   reads the topic to its end as of the question (at most `CATCH_UP_SECONDS`), so that a core
   just resumed from a pause lists what was said while it slept. (`current`, `members`)
4. Of the live cores of a shard whose heartbeats say they lead, one is listed as leader: the
   strongest claim (the later epoch, then the later heartbeat on the topic). A core not heard
   within three heartbeats is never listed as leader: a leader killed, paused or cut off loses
   the lease once its session times out, and one that comes back follows (`leadership`, steps
   3 and 6). So it is listed as a standby, not alive, as is a live one whose claim is weaker
   (a leader paused and replaced, before it has heard that it was). (`_one_leader`)
5. A core that stops (not killed) says so in a last heartbeat (`STOPPED`): it is listed as
   stopped, not alive, until forgotten. (`__aexit__`)

The lease's group member reads the same partition while it leads, and passes heartbeats over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Self

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from aggregator.intake.leadership import Role
from ingest.kafka import KafkaSettings, retrying, start_producer, stop_within
from ingest.tasks import cancel_within
from meters.times import now_us

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
STOPPED = "stopped"  # the role of a core's last heartbeat as it stops (step 5)
STOP_SECONDS = 1.0  # how long a stopping core tries to say so
FORGET_SECONDS = 300.0  # a core not heard from this long is not listed
CATCH_UP_SECONDS = 1.0  # a list waits at most this long for the heartbeats said before it
LOOKBACK = 1000  # heartbeats read back at start: 2,000 s of 1 core, 400 s of 5
KIND = "meterline.core"


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    url: str
    role: str  # leader, standby, replica, stopped (step 5); embedded: embedded
    journal_offset: int | None
    epoch: int
    heard_at_us: int
    shard: str = "0/1"  # I/N (`ingest.kafka.Shard`); heartbeats from before shards: 0/1
    alive: bool = True
    this: bool = False  # the core answering
    offset: float = math.inf  # where the heartbeat was read on the lease topic (this core: now)


def alone(url: str) -> Callable[[], Awaitable[list[Member]]]:
    """What an embedded core lists: itself."""
    core = str(uuid.uuid4())

    async def members() -> list[Member]:
        return [Member(core, url, "embedded", None, 0, now_us(), alive=True, this=True)]

    return members


class Members:
    """Steps 1 and 2 while entered (an async context manager); `current` and `members` are
    steps 3 and 4.
    `describe` says this core's role, journal offset and epoch at each heartbeat."""

    def __init__(
        self,
        kafka: KafkaSettings,
        url: str,
        describe: Callable[[], tuple[str, int | None, int]],
        role: Role,
    ) -> None:
        """`role`: a heartbeat goes at once when it changes."""
        self._kafka = kafka
        self._url = url
        self._describe = describe
        self._role = role
        self.id = str(uuid.uuid4())
        self._heard: dict[str, Member] = {}
        self._producer: AIOKafkaProducer | None = None  # started as it announces
        self._reader = kafka.reader(fetch_max_wait_ms=100)  # a list waits for its fetch
        self._tasks: list[asyncio.Task[None]] = []
        self._read_to = -1  # the lease topic's offset `_hear` has read up to
        self._read = asyncio.Event()  # set (and replaced) as it reads on

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._announce(), name="members-announce"),
            asyncio.create_task(self._hear(), name="members-hear"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(*self._tasks, what="members")
        # Step 5, if the producer ever started: a stop is told apart from a death.
        if self._producer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_SECONDS):
                    await self._send(replace(self._heartbeat(), role=STOPPED))
        bound = self._kafka.stop_timeout_seconds
        if self._producer is not None:
            await stop_within(self._producer.stop, bound, "members producer")
        await stop_within(self._reader.stop, bound, "members reader")

    async def current(self) -> list[Member]:
        """Step 3: `members`, once what the lease topic held when asked is read."""
        tp = TopicPartition(self._kafka.lease_topic, 0)
        if self._read_to >= 0:  # else not reading yet: what is heard
            with contextlib.suppress(TimeoutError, KafkaError):  # the broker away: the same
                async with asyncio.timeout(CATCH_UP_SECONDS):
                    end = (await self._reader.end_offsets([tp]))[tp]
                    while self._read_to < end:
                        await self._read.wait()
        return self.members()

    def members(self) -> list[Member]:
        """Steps 3 and 4, as heard so far."""
        now = now_us()
        forgotten = now - int(FORGET_SECONDS * 1_000_000)
        self._heard = {k: m for k, m in self._heard.items() if m.heard_at_us > forgotten}
        heard = [*self._heard.values(), self._heartbeat()]
        listed = [
            replace(
                member,
                alive=member.role != STOPPED
                and now - member.heard_at_us < 3 * HEARTBEAT_SECONDS * 1_000_000,
                this=member.id == self.id,
            )
            for member in heard
        ]
        return sorted(_one_leader(listed), key=lambda m: (-m.heard_at_us, m.id))

    def _heartbeat(self) -> Member:
        role, offset, epoch = self._describe()
        return Member(self.id, self._url, role, offset, epoch, now_us(), str(self._kafka.shard))

    async def _announce(self) -> None:
        """Step 1."""
        self._producer = await retrying(partial(start_producer, self._kafka, linger_ms=0))
        while True:
            member = self._heartbeat()
            said = self._role.changes  # what the heartbeat says: a change after it, at once
            try:
                await self._send(member)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
                log.warning("a heartbeat was not sent: %r", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    await self._role.changed(since=said)

    async def _send(self, member: Member) -> None:
        value = orjson.dumps(
            {
                "kind": KIND,
                "id": member.id,
                "url": member.url,
                "role": member.role,
                "journal_offset": member.journal_offset,
                "epoch": member.epoch,
                "at_us": member.heard_at_us,
                "shard": member.shard,
            }
        )
        assert self._producer is not None
        await self._producer.send_and_wait(self._kafka.lease_topic, value, partition=0)

    async def _hear(self) -> None:
        """Step 2."""
        reader, tp = self._reader, TopicPartition(self._kafka.lease_topic, 0)
        await retrying(reader.start)
        reader.assign([tp])
        beginning = (await reader.beginning_offsets([tp]))[tp]
        end = (await reader.end_offsets([tp]))[tp]
        reader.seek(tp, max(beginning, end - LOOKBACK))
        while True:
            fetched = await reader.getmany(tp, timeout_ms=1000)
            for record in fetched.get(tp, []):
                member = _member(record.value, record.offset)
                if member is not None and member.id != self.id:
                    self._heard[member.id] = member
            self._read_to = await reader.position(tp)
            self._read.set()
            self._read = asyncio.Event()


def _one_leader(members: list[Member]) -> list[Member]:
    """Step 4."""
    leaders: dict[str, Member] = {}
    for m in members:
        if m.role == "leader" and m.alive:
            rival = leaders.get(m.shard)
            if rival is None or _claim(m) > _claim(rival):
                leaders[m.shard] = m
    return [
        m if m.role != "leader" or leaders.get(m.shard) is m else replace(m, role="standby")
        for m in members
    ]


def _claim(member: Member) -> tuple[int, float]:
    return member.epoch, member.offset


def _member(value: bytes | None, offset: int) -> Member | None:
    try:
        data = orjson.loads(value or b"")
        if not isinstance(data, dict) or data.get("kind") != KIND:
            return None
        offset = data["journal_offset"]
        return Member(
            str(data["id"]),
            str(data["url"]),
            str(data["role"]),
            None if offset is None else int(offset),
            int(data["epoch"]),
            int(data["at_us"]),
            str(data.get("shard", "0/1")),
            offset=offset,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
