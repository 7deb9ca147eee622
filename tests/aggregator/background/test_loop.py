"""The background work's base (`aggregator.background.loop`): steps of every task take turns,
and a step that fails is retried with backoff, logged when it starts failing and when it
recovers."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest

from aggregator.background.loop import Steps
from aggregator.intake.journal import Entry, Records
from aggregator.store import Outcome, Positions
from meters.commands import Command


class _Work(Steps):
    kind = "test"
    what = "test work"

    async def _resume(self) -> None:
        pass

    def on_applied(self, command: Command, outcome: Outcome) -> None:
        pass

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        pass


def _work() -> _Work:
    store: Any = object()  # the base keeps it for the subclass; these steps never reach it
    return _Work(store, None, None, retry_seconds=0.01, max_retry_seconds=0.04)


def test_steps_of_tasks_take_turns_until_each_is_done() -> None:
    asyncio.run(_take_turns())


async def _take_turns() -> None:
    work = _work()
    inside = 0
    most = 0
    steps: dict[str, int] = {"a": 0, "b": 0, "c": 0}

    def stepper(key: str, needed: int) -> Any:
        async def step() -> bool:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1
            steps[key] += 1
            return steps[key] == needed

        return step

    await asyncio.gather(
        *(work._until_done(key, stepper(key, n)) for key, n in (("a", 3), ("b", 5), ("c", 1)))
    )
    assert steps == {"a": 3, "b": 5, "c": 1}
    assert most == 1


def test_a_failing_step_is_retried_with_backoff_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        calls = asyncio.run(_failing_four_times())
    assert len(calls) == 5
    waits = [b - a for a, b in itertools.pairwise(calls)]
    # 0.01, 0.02, 0.04, then at most 0.04 (doubled up to the most).
    assert all(w >= d * 0.9 for w, d in zip(waits, (0.01, 0.02, 0.04, 0.04), strict=True))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the test's work failing" in m for m in messages) == 1, messages
    assert sum("the test's work recovered" in m for m in messages) == 1, messages


async def _failing_four_times() -> list[float]:
    work = _work()
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def step() -> bool:
        calls.append(loop.time())
        if len(calls) <= 4:
            raise RuntimeError("not yet")
        return True

    await work._until_done("the test's work", step)
    return calls
