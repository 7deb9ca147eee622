"""The base of the store's background work: backfills (`backfill`), void jobs (`voids`) and
credit plans' cycles (`plan_cycler`).

Each does its work as writer jobs small enough that other writes go on between them, and each
job is a step of the log's order, so that every core applies it at the same place:

1. Embedded: a step is a job of the store's writer, run when this process wants it.
2. Kafka mode: a step is a group of the journal (`intake.journal`), appended only by the core
   that leads (`intake.leadership`), once the journal has been read up to its end at start (a
   step another core appended may have done the work) and only if the work is still due
   (`Background.leading`); the entry names the step, the journal applies it.
3. A core that follows appends nothing: it applies the journal's entries of the work's kind
   (`replay`), and its own work waits to step until it leads.

`Steps` adds what a backfill and a void job share: one task per key (a meter, a job), started
by the write records that make the work (`on_applied`) and at start for unfinished work; the
tasks take turns, one step at a time whatever their number; a step that fails is retried with
exponential backoff, logged when it starts failing and when it recovers.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ClassVar, Self

from aggregator.intake.journal import Entry, Journal, Records
from aggregator.intake.leadership import Role
from aggregator.store import Outcome, Positions, Store
from ingest.tasks import Backoff, KeyedTasks
from meters.commands import Command

__all__ = ["Background", "Steps"]


class Background(ABC):
    """An async context manager running one kind of the store's background work: in Kafka
    mode, the journal's entries of `kind` are its own to apply (step 3)."""

    kind: ClassVar[str]  # the journal's topic name for its steps (`intake.journal`)

    def __init__(self, store: Store, journal: Journal | None, role: Role | None) -> None:
        """`journal`: steps are its groups (Kafka mode), run only while this core leads
        (`role`; None: always)."""
        self._store = store
        self._journal = journal
        self._role = role or Role(leading=True)

    async def __aenter__(self) -> Self:
        if self._journal is not None:
            self._journal.follow(self.kind, self)
        await self._started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stopped()

    @abstractmethod
    async def _started(self) -> None: ...

    @abstractmethod
    async def _stopped(self) -> None:
        """Within a bounded time: progress is committed step by step."""

    @abstractmethod
    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        """Step 3: a journal entry's step (`journal.Follower`)."""

    async def leading(self, due: Callable[[], Awaitable[bool]]) -> bool:
        """Step 2, before a step of this core's own in Kafka mode: once the journal has been
        read up to its end at start and this core leads, whether the work is still `due`."""
        assert self._journal is not None
        await self._journal.started()
        await self._role.until(True)
        return await due()


class Steps(Background):
    """Background work in steps, one task per key, the tasks taking turns (see the module)."""

    what: ClassVar[str]  # "backfiller", as the log says it

    def __init__(
        self,
        store: Store,
        journal: Journal | None,
        role: Role | None,
        *,
        retry_seconds: float,
        max_retry_seconds: float,
    ) -> None:
        super().__init__(store, journal, role)
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._tasks = KeyedTasks(self.what)
        self._turn = asyncio.Lock()  # FIFO: the tasks take turns
        self._detach: Callable[[], None] = lambda: None

    async def _started(self) -> None:
        await self._resume()
        # Work made by a write record, however it came (this core's API, or the control
        # topic written by another).
        self._detach = self._store.listeners.attach_applied(self.on_applied)

    async def _stopped(self) -> None:
        self._detach()
        await self._tasks.cancel()

    @abstractmethod
    async def _resume(self) -> None:
        """Start a task for each unfinished piece of work."""

    @abstractmethod
    def on_applied(self, command: Command, outcome: Outcome) -> None:
        """Start a task for the work that an applied write record made, if any."""

    async def idle(self) -> None:
        """Returns once every task running now is done (tests, benchmarks)."""
        await self._tasks.idle()

    async def _until_done(self, what: str, step: Callable[[], Awaitable[bool]]) -> None:
        """Run `step` in turn with the other tasks until it says the work is done; a failure
        is retried with backoff."""
        backoff = Backoff(self._retry, self._max_retry, what)
        while True:
            try:
                async with self._turn:
                    done = await step()
            except Exception as exc:  # noqa: BLE001 - every failure is retried, logged once
                await backoff.failed(exc)
                continue
            backoff.succeeded()
            if done:
                return
