"""One holder at a time per key (an organization), for async callers, with nothing kept for a
key that no one holds or waits for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Gates:
    def __init__(self) -> None:
        # Per key: its lock, and how many hold it or wait for it.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def acquire(self, key: str) -> Callable[[], None]:
        """Wait until no one else holds `key`, then hold it: returns the function that lets it
        go (later calls do nothing), to be called on the event loop."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave(key, users)
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                lock.release()
                self._leave(key, users)

        return release

    def _leave(self, key: str, users: list[int]) -> None:
        users[0] -= 1
        if not users[0]:
            del self._locks[key]
