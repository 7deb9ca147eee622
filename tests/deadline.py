"""One deadline per test, stretched by the machine's load, and the one way a test waits.

The rule:

1. A test has `BUDGET` seconds of a quiet machine's time, from its setup to its teardown.
2. Its clock counts each second of wall time as 1 / max(1, load / cores) of a second (the
   one-minute load average, read as the test runs): on a machine busy twice over, the test
   may take twice as long.
3. Every wait of the test draws on that one budget (`wait_for`, `seconds_left`); no step has
   a timeout of its own. A wait that runs out says what it waited for, and shows the last
   lines of the processes the test started (and of those shared with it that still run).
4. The hang guard (pytest-timeout's `timeout`, 300 s) is stretched alike, by the load at the
   test's start (`tests/conftest.py`): it stops a test stuck where no wait is.

A test that asserts something happens within N s because N is the product's promise asserts
that with its own clock (those tests run in the serial phase). Outside a test (benchmarks),
each wait has a `BUDGET` of its own, or the one of the `budget` it runs in."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")

BUDGET = 240.0
LOG_LINES = 25  # of each process, in a failed wait's message


def load_factor() -> float:
    """How many times over the machine is busy: the one-minute load per core, at least 1."""
    return max(1.0, os.getloadavg()[0] / len(os.sched_getaffinity(0)))


class Watched(Protocol):
    """A process a failed wait shows: a name, whether it runs, and its last lines."""

    def describe(self) -> str: ...

    def running(self) -> bool: ...

    def last_lines(self, count: int) -> list[str]: ...


class Deadline:
    """A budget of quiet-machine seconds, spent at the rate the load allows (rule 2)."""

    def __init__(self, budget: float = BUDGET) -> None:
        self.budget = budget
        self.started = time.monotonic()
        self._spent = 0.0
        self._at = self.started
        self._factor = load_factor()
        self._lock = threading.Lock()  # waits run in the test's threads too

    def spent(self) -> float:
        """Quiet-machine seconds used so far."""
        with self._lock:
            now = time.monotonic()
            self._spent += (now - self._at) / self._factor
            self._at, self._factor = now, load_factor()
            return self._spent

    def seconds_left(self) -> float:
        """Wall seconds left at the current load (what a blocking call may wait)."""
        left = self.budget - self.spent()
        return max(0.0, left * self._factor)

    def expired(self) -> bool:
        return self.spent() >= self.budget


_current: Deadline | None = None
_watched: list[tuple[float, Watched]] = []  # (started at, process)


def current() -> Deadline:
    """The running test's deadline; outside a test, a new one for this wait."""
    return _current or Deadline()


@contextlib.contextmanager
def budget(seconds: float = BUDGET) -> Iterator[Deadline]:
    """A deadline for what runs inside: a test from its setup to its teardown
    (`tests/conftest.py`), or a benchmark's step that takes longer than a test may."""
    global _current
    outer, _current = _current, Deadline(seconds)
    try:
        yield _current
    finally:
        _current = outer
        _watched[:] = [(at, p) for at, p in _watched if p.running()]  # shared ones go on


def watch(process: Watched) -> None:
    """Show `process`'s last lines when a wait of this test (or of a later one, while the
    process runs) fails."""
    _watched.append((time.monotonic(), process))


def seconds_left() -> float:
    """Wall seconds the test may still wait, at the current load: the timeout of a blocking
    call (a process's exit, a queue's next item). After it, the caller says what is missing."""
    return current().seconds_left()


def next_of(what: str, items: queue.Queue[T]) -> T:
    """The next item of `items` (put there by a thread of the test), on the test's deadline."""
    try:
        return items.get(timeout=seconds_left())
    except queue.Empty:
        raise AssertionError(waited_too_long(what)) from None


def wait_for(what: str, predicate: Callable[[], T | None]) -> T:
    """Poll `predicate` until it gives a true value (returned), on the test's deadline;
    `what`: the step, as the failure names it ("the core to apply 300 events")."""
    deadline = current()
    pause = 0.01
    while True:
        if found := predicate():
            return found
        if deadline.expired():
            raise AssertionError(waited_too_long(what, deadline))
        # Polls cost the servers asked: often at first, then at most 4 times a second.
        time.sleep(pause)
        pause = min(0.25, pause * 2)


async def until(what: str, predicate: Callable[[], T | Awaitable[T | None] | None]) -> T:
    """`wait_for` in a coroutine (the loop runs on while it waits); `predicate` may be one
    too."""
    deadline = current()
    pause = 0.01
    while True:
        found = predicate()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found  # type: ignore[return-value]
        if deadline.expired():
            raise AssertionError(waited_too_long(what, deadline))
        await asyncio.sleep(pause)
        pause = min(0.25, pause * 2)


def waited_too_long(what: str, deadline: Deadline | None = None) -> str:
    """The failure of a wait: the step, the time and load, each process's last lines."""
    deadline = deadline or current()
    waited = time.monotonic() - deadline.started
    lines = [
        f"waited for {what}: not reached {waited:.0f} s into the test "
        f"(budget {deadline.budget:.0f} s at load factor {load_factor():.1f})"
    ]
    for at, process in _watched:
        if at >= deadline.started or process.running():
            state = "running" if process.running() else "ended"
            lines.append(f"--- {process.describe()} ({state}), last lines:")
            lines += process.last_lines(LOG_LINES) or ["(no output)"]
    return "\n".join(lines)
