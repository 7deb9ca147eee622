"""DeltaTimeStrategy: time spent, measured by a context manager, a decorator or start/stop,
with a pluggable clock. The default clock counts milliseconds, as @polar-sh/ingestion's
documented `performance.now()` does, so a meter summing `deltaTime` reads the same from both.
One event per measurement, recorded when it ends (also when the measured code raised: the time
was spent):

    {"deltaTime": 418.2, "strategy": "DeltaTime"}     # in the clock's unit
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from ingest.sdk.strategies.base import BaseStrategy, Use

__all__ = ["DeltaTimeStrategy"]

F = TypeVar("F", bound=Callable[..., Any])
Clock = Callable[[], float]


def milliseconds() -> float:
    """A monotonic clock in milliseconds (JavaScript's `performance.now()` unit)."""
    return time.perf_counter_ns() / 1_000_000


class DeltaTimeStrategy(BaseStrategy):
    # Not bound as a method: a staticmethod object is read through the class as the function.
    _clock: Clock = staticmethod(milliseconds)

    def clock(self, clock: Clock) -> Self:
        """Measure with `clock` (e.g. `time.perf_counter` for seconds, `time.process_time`, a
        fake clock in tests); `deltaTime` is in its unit. Returns the strategy (chainable)."""
        self._clock = clock
        return self

    def measure(
        self,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        **metadata: Any,
    ) -> Measure:
        """`with timer.measure(external_customer_id="c1"): ...` (or `async with`), or as a
        decorator of a function or coroutine function: one event per block or call."""
        return Measure(self, self.use(customer_id, external_customer_id, metadata))

    def start(
        self,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        **metadata: Any,
    ) -> Callable[[], str | None]:
        """@polar-sh/ingestion's form: start now; the returned function stops and records
        (once), returning the event's external_id."""
        measure = self.measure(
            customer_id=customer_id, external_customer_id=external_customer_id, **metadata
        )
        started = self._clock()
        stopped: list[str | None] = []

        def stop() -> str | None:
            if not stopped:
                stopped.append(measure.record(self._clock() - started))
            return stopped[0]

        return stop


class Measure:
    """A context manager (sync and async) and decorator; reusable: each use is timed alone."""

    def __init__(self, strategy: DeltaTimeStrategy, use: Use) -> None:
        self._strategy = strategy
        self._use = use
        self._started: list[float] = []  # a stack, so that nested uses of one Measure work

    def record(self, elapsed: float) -> str | None:
        return self._use.record({"deltaTime": elapsed, "strategy": "DeltaTime"})

    def __enter__(self) -> Self:
        self._started.append(self._strategy._clock())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.record(self._strategy._clock() - self._started.pop())

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: F) -> F:
        strategy = self._strategy

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                started = strategy._clock()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.record(strategy._clock() - started)

            return cast(F, timed_async)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = strategy._clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.record(strategy._clock() - started)

        return cast(F, timed)
