"""A consumer task that dies of anything but cancellation says so: metering has stopped."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aggregator.intake.consumer import _report_stop


def test_a_consumer_that_dies_says_so_and_a_cancelled_one_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def dies() -> None:
        raise RuntimeError("broken")

    async def run() -> None:
        died = asyncio.create_task(dies())
        cancelled = asyncio.create_task(asyncio.sleep(10))
        cancelled.cancel()
        await asyncio.gather(died, cancelled, return_exceptions=True)
        _report_stop(cancelled)
        assert not caplog.records
        _report_stop(died)

    with caplog.at_level(logging.CRITICAL, logger="aggregator.intake.consumer"):
        asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == [
        "the Kafka consumer stopped; no events are applied"
    ]
