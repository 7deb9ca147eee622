"""Which core leads: the one Kafka's group coordinator gives the lease topic's one partition.

The leader alone reads the events and control topics and appends the journal's groups, runs
the timers that append groups (backfill steps, plan cycles) and delivers webhooks; every other
core follows the journal (`journal`, step 6). The protocol:

1. Every core in Kafka mode but replicas joins the core's consumer group on `<topic>.lease` (one
   partition, no records). Each member's claim goes with its join: whether it leads, its
   journal epoch and position. The partition goes to the strongest claim (`_LeaseAssignor`):
   a leader stays leader as cores join and leave; of two that both believe they lead (one
   paused past its session, then resumed), the one of the later epoch; else the core furthest
   along the journal. (`Lease`)
2. The core assigned the partition leads; one a rebalance leaves without it follows. A
   revocation alone changes nothing: every rebalance revokes before it assigns, and the holder
   is assigned the partition again.
3. A leader killed, paused or cut off past the session timeout loses the partition to another
   member, which catches up on the journal and leads from there.
4. Leading is a hint, never a guarantee: a leader cut off from the group believes it leads
   until the group tells it otherwise (a paused one: step 6). What it appends counts only
   where the journal takes it: an entry that does not land where this core expected the
   journal's end makes it catch up first, or step down when another core drew a later epoch
   (`Journal.append`), and one of an older epoch than an entry applied before it is skipped
   by every core.
5. The group has the last word: a core whose role has disagreed with its assignment for a
   session timeout takes the assignment's (one that stepped down but still holds the lease
   leads again). A member that cannot join, or whose polls fail `REJOIN_AFTER` times in a
   row, is replaced by a new one (a join the broker refused stays refused). (`_poll`)
6. A leader that has not run for half a session timeout (paused, or its event loop held)
   may have lost the lease meanwhile: the group may have given it to a core that acts
   already. So it leads no more from the moment it runs again, before any of its tasks can
   send anything (`Role.leading` tells the time itself), and until the group has the last
   word (step 5, the session timeout counted from then). Its side effects ask `leading` as
   they are about to send. (`Role.lapse_after`, `_watch`)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import KafkaError

from ingest.kafka import KafkaSettings, ensure_topics, stop_within
from ingest.tasks import cancel_within

log = logging.getLogger(__name__)


class Role:
    """Whether this core leads now (a port: the lease sets it, the leader's work waits on it).
    Embedded, a core always leads. A lease's role lapses (`Lease`, step 6)."""

    def __init__(self, leading: bool = False) -> None:
        self._leading = leading
        self._changed = asyncio.Event()
        self.changes = 0  # how many times it started or stopped leading (`changed`)
        self._lapse: float | None = None  # seconds not run after which leading lapses
        self._ran_at = time.monotonic()
        self.lapsed_at = -math.inf  # when it last lapsed (monotonic)

    @property
    def leading(self) -> bool:
        """Step 6: False from the moment this core runs again after a lapse (whichever of its
        tasks asks first), before the watch has run."""
        self._lapsed()
        return self._leading

    def lapse_after(self, seconds: float) -> None:
        """Step 6: leading lapses once this core has not run for `seconds` (`ran` says it
        does)."""
        self._lapse = seconds
        self._ran_at = time.monotonic()

    def ran(self) -> None:
        """This core runs now (the lease's watch, several times per lapse)."""
        self._lapsed()
        self._ran_at = time.monotonic()

    def _lapsed(self) -> None:
        if not self._leading or self._lapse is None:
            return
        now = time.monotonic()
        if now - self._ran_at > self._lapse:
            log.warning(
                "this core did not run for %.1f s: it leads no more until the group says it"
                " holds the lease",
                now - self._ran_at,
            )
            self.lapsed_at = now
            self.set(False)

    def set(self, leading: bool) -> None:
        if leading:
            self._ran_at = time.monotonic()  # the group said so just now
        if leading != self._leading:
            self._leading = leading
            self.changes += 1
            self._changed.set()
            self._changed = asyncio.Event()

    async def until(self, leading: bool) -> None:
        """Returns once this core leads (`leading`) or follows."""
        while self.leading != leading:
            await self._changed.wait()

    async def changed(self, since: int | None = None) -> None:
        """Returns once this core starts or stops leading; at once if it has since `changes`
        was `since` (a change made while the caller was away is not missed)."""
        if since is not None and since != self.changes:
            return
        await self._changed.wait()


async def while_leading(
    role: Role, lead: Callable[[], AbstractAsyncContextManager[Any]], retry_seconds: float = 1.0
) -> None:
    """Hold `lead()` open while this core leads: closed when it stops leading, opened again
    when it leads again, and after a pause when it fails. Runs until cancelled."""
    while True:
        await role.until(True)
        try:
            async with lead():
                await role.until(False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the leader's work failed to start or stop; starting it again")
            await asyncio.sleep(retry_seconds)


@contextlib.asynccontextmanager
async def task_while_open(
    name: str, run: Callable[[], Any], stopped: Callable[[asyncio.Task[Any]], None]
) -> AsyncIterator[None]:
    """`run()` as a task while the context is open; cancelled and awaited at its end.
    `stopped` is told when the task ends (by cancellation or not: it ends only so)."""
    task = asyncio.create_task(run(), name=name)
    task.add_done_callback(stopped)
    try:
        yield
    finally:
        await cancel_within(task, what=name)


class Lease:
    """Steps 1 to 3 and 6: an async context manager holding this core's membership; `role`
    says whether it leads."""

    POLL_MS = 1000  # the member polls (an empty topic) to stay in the group
    REJOIN_AFTER = 5  # polls failed in a row, after which a new member joins
    REJOIN_MAX_SECONDS = 5.0  # between joins refused in a row (the pause doubles up to it)
    # Step 6: not run for this much of a session timeout, a leader lapses. A member is let go
    # after a session without heartbeats, sent every third of one: a pause longer than two
    # thirds of one may lose the lease, and one longer than half is always noticed.
    LAPSE = 0.5

    def __init__(self, kafka: KafkaSettings, role: Role, claim: Callable[[], Claim]) -> None:
        """`claim`: this core's, as of its next join (`Journal.claim`)."""
        self._kafka = kafka
        self.role = role
        self._assignor = _LeaseAssignor(claim)
        self._member: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        await ensure_topics(self._kafka)
        self._member = self._joining()
        self.role.lapse_after(self._kafka.session_timeout_seconds * self.LAPSE)
        # Joined in the background: a member's start waits for its first assignment, which
        # waits out a killed predecessor's session; the core serves reads meanwhile.
        self._tasks = [
            asyncio.create_task(self._poll(), name="lease"),
            asyncio.create_task(self._watch(), name="lease-watch"),
        ]
        return self

    def _joining(self) -> AIOKafkaConsumer:
        kafka = self._kafka
        session_ms = round(kafka.session_timeout_seconds * 1000)
        member = kafka.member(
            kafka.lease_group,
            enable_auto_commit=False,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=session_ms // 3,
            partition_assignment_strategy=(self._assignor,),
        )
        member.subscribe([kafka.lease_topic], listener=_Assigned(self.role))
        return member

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(*self._tasks, what="lease")
        if self._member is not None:  # leaving the group hands the lease on at once
            await stop_within(self._member.stop, self._kafka.stop_timeout_seconds, "lease member")
        self.role.set(False)

    async def _poll(self) -> None:
        """Step 5, by one member after another: a member whose start or polls failed for good
        (the broker refused the group's protocol, say) stays failed, so a new one joins."""
        refused = 0
        while True:
            assert self._member is not None
            member = self._member
            try:
                await member.start()
            except KafkaError as exc:
                refused += 1
                log.warning("the lease member could not join (%s); a new one tries again", exc)
            else:
                refused = 0
                await self._follow_group(member)
            await stop_within(member.stop, self._kafka.stop_timeout_seconds, "lease member")
            self.role.set(False)  # out of the group: the lease is another's, or ours again
            self._member = self._joining()
            await asyncio.sleep(min(self.REJOIN_MAX_SECONDS, 2.0**refused))

    async def _watch(self) -> None:
        """Step 6: says that this core runs, four times per lapse."""
        every = self._kafka.session_timeout_seconds * self.LAPSE / 4
        while True:
            self.role.ran()
            await asyncio.sleep(every)

    async def _follow_group(self, member: AIOKafkaConsumer) -> None:
        """Step 5 until the member's polls fail `REJOIN_AFTER` times in a row."""
        role, session = self.role, self._kafka.session_timeout_seconds
        agreed = time.monotonic()
        failures = 0
        while failures < self.REJOIN_AFTER:
            held = bool(member.assignment())
            if held == role.leading:
                agreed = time.monotonic()
            # A lapse (step 6) disagrees from when it was found, not from before the pause.
            elif time.monotonic() - max(agreed, role.lapsed_at) >= session:
                log.warning("this core %s, as the group says", "leads" if held else "follows")
                role.set(held)
            try:
                await member.getmany(timeout_ms=self.POLL_MS)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                log.exception("the lease member's poll failed (%d in a row)", failures)
                await asyncio.sleep(1)
        log.warning("a new lease member joins: the last one's polls failed %d times", failures)


Claim = tuple[bool, int, int]  # leading, the journal's epoch, its position (-1: none)


class _LeaseAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Step 1: the lease to the strongest claim (ties: the lowest member id)."""

    name = "meterline-lease"
    version = 0

    def __init__(self, claim: Callable[[], Claim]) -> None:
        self._claim = claim

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        leading, epoch, position = self._claim()
        claim = f"{int(leading)} {epoch} {position}".encode()
        return ConsumerProtocolMemberMetadata(self.version, list(topics), claim)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        def strength(member: str) -> tuple[int, ...]:
            try:
                return tuple(int(v) for v in members[member].user_data.split())
            except (TypeError, ValueError):  # no claim: the weakest
                return (-1,)

        holder = max(sorted(members), key=strength)  # max keeps the first of equals
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version,
                sorted((topic, [0]) for topic in members[member].subscription if member == holder),
                b"",
            )
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    """Step 2."""

    def __init__(self, role: Role) -> None:
        self._role = role
        self._told = False  # a core that stands by from its start says so once

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        leading = bool(assigned)
        if leading != self._role.leading or not self._told:
            log.warning("this core %s", "leads" if leading else "follows the leader")
            self._told = True
        self._role.set(leading)
