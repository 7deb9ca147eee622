"""Stopping background tasks within a bound: an owner's exit never waits on a task for good."""

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
