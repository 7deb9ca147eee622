"""AsyncIngestion against a real `meterline up`: batching on the event loop, a 422 answered per
event, waiting for room with aingest(), and aclose() reporting what it could not deliver."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingest.sdk import AsyncIngestion, EventsRejected, QueueFull, SDKError, Undelivered
from tests.deadline import seconds_left, until
from tests.faults import FaultProxy
from tests.ingest.sdk.conftest import Reports, stored
from tests.processes import Server, free_port

pytestmark = pytest.mark.slow


def event(customer: str, seq: int, **metadata: object) -> dict[str, object]:
    return {
        "name": "api_call",
        "external_customer_id": customer,
        "metadata": {"seq": seq, **metadata},
    }


def test_events_arrive_once_and_bad_ones_are_reported(meterline: Server, customer: str):
    reports = Reports()
    proxy = FaultProxy(meterline.url, ["503", "reset"], retry_after="0")

    async def main() -> None:
        async with AsyncIngestion(
            meterline.token,
            base_url=proxy.url,
            max_batch_size=50,
            flush_interval=60,
            on_error=reports,
        ) as ingestion:
            for i in range(120):
                ingestion.ingest(event(customer, i, **({"bad": ""} if i == 60 else {})))
            assert await ingestion.flush(seconds_left())
            assert ingestion.stats().delivered == 119
            assert ingestion.stats().retries == 2

    try:
        asyncio.run(main())
    finally:
        proxy.close()
    assert sorted(e["metadata"]["seq"] for e in stored(meterline, customer)) == [
        i for i in range(120) if i != 60
    ]
    [rejected] = reports.errors
    assert isinstance(rejected, EventsRejected)
    assert [e["metadata"]["seq"] for e in rejected.events] == [60]


def test_aingest_waits_for_room_and_ingest_does_not(meterline: Server, customer: str):
    proxy = FaultProxy(meterline.url, ["stall"], stall_seconds=0.5)

    async def main() -> None:
        async with AsyncIngestion(
            meterline.token,
            base_url=proxy.url,
            max_batch_size=5,
            max_queue_size=5,
            max_in_flight=1,
            flush_interval=0,
            on_full="block",
            block_timeout=5,
        ) as ingestion:
            for i in range(5):
                ingestion.ingest(event(customer, i))
            # The sender took them; its request stalls.
            await until("the sender to take them", lambda: proxy.bodies)
            for i in range(5, 10):
                ingestion.ingest(event(customer, i))
            with pytest.raises(QueueFull):  # ingest() never blocks the loop
                ingestion.ingest(event(customer, 10))
            started = time.monotonic()
            await ingestion.aingest(event(customer, 10))  # waits until the batch is answered
            assert time.monotonic() - started > 0.1

    try:
        asyncio.run(main())
    finally:
        proxy.close()
    assert sorted(e["metadata"]["seq"] for e in stored(meterline, customer)) == list(range(11))


def test_aclose_reports_what_it_could_not_deliver(customer: str):
    reports = Reports()

    async def main() -> None:
        ingestion = AsyncIngestion(
            "t", base_url=f"http://127.0.0.1:{free_port()}", max_batch_size=3, on_error=reports
        )
        for i in range(7):
            ingestion.ingest(event(customer, i))
        await ingestion.aclose(timeout=0.3)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 2
    assert sorted(e["metadata"]["seq"] for e in reports.events(Undelivered)) == list(range(7))


def test_it_needs_a_running_loop():
    ingestion = AsyncIngestion("t", base_url="http://127.0.0.1:1", flush_at_exit=False)
    with pytest.raises(SDKError, match="event loop"):
        ingestion.ingest({"name": "x", "external_customer_id": "c"})
