"""Background tasks: stopped within a bound (an owner's exit never waits on a task for good),
one per key of work (`KeyedTasks`), their steps sized on what the last one took (`next_chunk`)
and their failing steps retried with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

EXIT_SECONDS = 10.0


async def cancel_within(
    *tasks: asyncio.Future[Any] | None, what: str, seconds: float = EXIT_SECONDS
) -> None:
    """Cancel `tasks` (None: none started) and wait for them, at most `seconds`: past it, a
    task that outlives its cancellation (waiting on a thread, say) is logged and left."""
    started = [t for t in tasks if t is not None]
    for task in started:
        task.cancel()
    if not started:
        return
    done, pending = await asyncio.wait(started, timeout=seconds)
    for task in done:  # what they raised is theirs to log: retrieved, not raised here
        if not task.cancelled():
            task.exception()
    if pending:
        log.error("%s: %d task(s) still running %.0f s after cancel", what, len(pending), seconds)


class KeyedTasks:
    """At most one task per key (a meter's backfill, a void job): a key running already is left
    to its task, and a task that ends leaves the set."""

    def __init__(self, what: str) -> None:
        self._what = what  # "backfiller", as the log says it
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, key: str, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        if key not in self._tasks:
            self._tasks[key] = task = asyncio.create_task(run(), name=name)
            task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def idle(self) -> None:
        """Returns once every task running now is done (tests, benchmarks)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def cancel(self) -> None:
        await cancel_within(*self._tasks.values(), what=self._what)


def next_chunk(chunk: int, seconds: float, target_seconds: float, low: int, high: int) -> int:
    """The size of a background job's next step, its last of `chunk` having taken `seconds`:
    scaled to take `target_seconds`, at most doubled, within [`low`, `high`]."""
    scaled = int(chunk * target_seconds / max(seconds, 1e-3))
    return max(low, min(high, scaled, chunk * 2))


class Backoff:
    """How a background task's step that fails is retried: after `first` seconds, doubled at
    each failure in a row up to `most`; logged when the task starts failing and when it
    recovers, not at every attempt."""

    def __init__(self, first: float, most: float, what: str) -> None:
        self._first = first
        self._most = most
        self._what = what  # "backfill of meter X", as the log says it
        self._delay = 0.0

    async def failed(self, exc: BaseException) -> None:
        """Wait before the next attempt (logged at the first failure of a run of them)."""
        self._delay = min(self._most, self._delay * 2 or self._first)
        if self._delay == self._first:
            log.warning(
                "%s failing; retrying with backoff up to %.0f s: %r", self._what, self._most, exc
            )
        await asyncio.sleep(self._delay)

    def succeeded(self) -> None:
        if self._delay:
            log.info("%s recovered", self._what)
            self._delay = 0.0
