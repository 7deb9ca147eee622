"""Background tasks: stopped within a bound (an owner's exit never waits on a task for good),
and their failing steps retried with backoff."""

from __future__ import annotations

import asyncio
import logging
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
