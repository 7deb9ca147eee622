"""The batching client against a real `meterline up` over HTTP, with faults injected by a
loopback proxy: batching by count, bytes and linger; the full-queue policies; retries that
honour Retry-After; 422s reported per event and never retried; flush, close and the flush at
interpreter exit."""

from __future__ import annotations

import inspect
import queue
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from ingest.sdk import (
    AsyncIngestion,
    ClientClosed,
    DeliveryFailed,
    EventsRejected,
    Ingestion,
    InvalidEvent,
    QueueFull,
    Undelivered,
)
from tests.deadline import seconds_left, wait_for
from tests.faults import FaultProxy
from tests.ingest.sdk.conftest import Reports, stored
from tests.processes import Server, free_port

pytestmark = pytest.mark.slow


def event(customer: str, seq: int, **extra: object) -> dict[str, object]:
    return {"name": "api_call", "external_customer_id": customer, "metadata": {"seq": seq}} | extra


def seqs(server: Server, customer: str) -> list[int]:
    return sorted(e["metadata"]["seq"] for e in stored(server, customer))


def test_events_arrive_once_with_their_record_time(meterline: Server, customer: str):
    reports = Reports()
    with Ingestion(
        meterline.token, base_url=meterline.url, flush_interval=30, on_error=reports
    ) as ingestion:
        recorded_at = datetime.now(UTC)
        ids = [ingestion.ingest(event(customer, i)) for i in range(3)]
        own = ingestion.ingest(event(customer, 3, external_id="own-id-1"))
        past = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        ingestion.ingest(event(customer, 4, timestamp=past))
        time.sleep(0.5)  # the events keep the time they were recorded at, not sent at
        assert ingestion.flush(seconds_left())
        # A retry of an event (same external_id) is the same event.
        ingestion.ingest(event(customer, 3, external_id="own-id-1"))
        assert ingestion.flush(seconds_left())
    assert own == "own-id-1"
    assert len(set(ids)) == 3 and all(i.startswith(ingestion.id_prefix) for i in ids)
    events = sorted(stored(meterline, customer), key=lambda e: e["metadata"]["seq"])
    assert [e["metadata"]["seq"] for e in events] == [0, 1, 2, 3, 4]
    for e in events[:4]:
        assert abs(datetime.fromisoformat(e["timestamp"]) - recorded_at) < timedelta(seconds=0.4)
    assert datetime.fromisoformat(events[4]["timestamp"]) == past
    assert reports.errors == []
    assert ingestion.stats().delivered == 6


def test_batches_are_cut_by_count_bytes_and_linger(meterline: Server, customer: str):
    proxy = FaultProxy(meterline.url, [])
    try:
        with Ingestion(
            meterline.token, base_url=proxy.url, max_batch_size=10, flush_interval=60
        ) as ingestion:
            for i in range(25):
                ingestion.ingest(event(customer, i))
            # Two full batches go at once; the other 5 wait for the linger time.
            wait_for("the two full batches to be sent", lambda: len(proxy.bodies) == 2)
            time.sleep(0.3)  # the point: a while in which the linger (60 s) sends nothing more
            assert len(proxy.bodies) == 2
            assert ingestion.flush(seconds_left())
            assert [len(orjson.loads(b)["events"]) for b in proxy.bodies] == [10, 10, 5]

        proxy.bodies.clear()
        with Ingestion(
            meterline.token, base_url=proxy.url, max_batch_bytes=1000, flush_interval=60
        ) as ingestion:
            for i in range(25, 45):
                ingestion.ingest(event(customer, i, metadata={"seq": i, "pad": "x" * 100}))
            assert ingestion.flush(seconds_left())
        assert len(proxy.bodies) > 3
        assert all(len(body) <= 1000 for body in proxy.bodies)
        assert sum(len(orjson.loads(b)["events"]) for b in proxy.bodies) == 20

        proxy.bodies.clear()
        with Ingestion(meterline.token, base_url=proxy.url, flush_interval=0.2) as ingestion:
            ingestion.ingest(event(customer, 45))
            # No flush: the linger (0.2 s) sends it.
            wait_for("the linger to send the one event", lambda: len(proxy.bodies) == 1)
    finally:
        proxy.close()
    assert seqs(meterline, customer) == list(range(46))


def test_a_full_queue_raises_or_blocks_and_ingest_never_waits_for_the_network(
    meterline: Server, customer: str
):
    # Every request stalls for 0.6 s (a slow server): the one sender is busy, the queue fills.
    proxy = FaultProxy(meterline.url, ["stall"] * 30, stall_seconds=0.6)
    common = {
        "base_url": proxy.url,
        "max_batch_size": 5,
        "max_queue_size": 5,
        "max_in_flight": 1,
        "flush_interval": 0,
        "timeout": 5.0,
    }

    def fill(ingestion: Ingestion, first: int) -> None:
        """Five events for the busy sender, five more in the queue: full."""
        sent = len(proxy.bodies)
        for i in range(first, first + 5):
            ingestion.ingest(event(customer, i))
        wait_for("the sender to take a batch", lambda: len(proxy.bodies) == sent + 1)
        for i in range(first + 5, first + 10):
            ingestion.ingest(event(customer, i))

    try:
        with Ingestion(meterline.token, on_full="raise", **common) as ingestion:
            fill(ingestion, 0)
            started = time.monotonic()
            with pytest.raises(QueueFull) as raised:
                ingestion.ingest(event(customer, 10))
            assert time.monotonic() - started < 0.3  # no wait for the stalled request
            assert isinstance(raised.value, queue.Full)  # as polar-sdk's helper raises

        with Ingestion(meterline.token, on_full="block", block_timeout=0.2, **common) as ingestion:
            fill(ingestion, 100)
            started = time.monotonic()
            with pytest.raises(QueueFull):
                ingestion.ingest(event(customer, 110))
            assert 0.2 <= time.monotonic() - started < 0.6

        with Ingestion(meterline.token, on_full="block", block_timeout=5, **common) as ingestion:
            fill(ingestion, 200)
            started = time.monotonic()
            ingestion.ingest(event(customer, 210))  # waits until the stalled batch is answered
            assert time.monotonic() - started < 4
    finally:
        proxy.close()
    assert seqs(meterline, customer) == [*range(10), *range(100, 110), *range(200, 211)]


def test_retries_honour_retry_after_and_count_once(meterline: Server, customer: str):
    proxy = FaultProxy(meterline.url, ["503", "429", "500", "reset"], retry_after="1")
    try:
        with Ingestion(meterline.token, base_url=proxy.url, flush_interval=0) as ingestion:
            for i in range(20):
                ingestion.ingest(event(customer, i))
            assert ingestion.flush(seconds_left())
            assert ingestion.stats().retries == 4
    finally:
        proxy.close()
    times = [t for t, _ in proxy.ingests]
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95  # Retry-After: 1
    assert times[3] - times[2] < 0.9  # no Retry-After: a short backoff
    assert seqs(meterline, customer) == list(range(20))  # the reset one arrived, once


def test_a_422_drops_only_the_events_it_names(meterline: Server, customer: str):
    reports = Reports()
    proxy = FaultProxy(meterline.url, [])
    bad = {
        3: event(customer, 3, metadata={"seq": 3, "a.b": 1}),
        7: event(customer, 7, name="n" * 129),
    }
    try:
        with Ingestion(
            meterline.token, base_url=proxy.url, flush_interval=60, on_error=reports
        ) as ingestion:
            for i in range(10):
                ingestion.ingest(bad.get(i) or event(customer, i))
            assert ingestion.flush(seconds_left())
            assert ingestion.stats().rejected == 2
    finally:
        proxy.close()
    assert len(proxy.bodies) == 2  # refused once, the rest sent again at once; never retried
    assert len(orjson.loads(proxy.bodies[1])["events"]) == 8
    [rejected] = reports.errors
    assert isinstance(rejected, EventsRejected) and rejected.status == 422
    assert [e["metadata"]["seq"] for e in rejected.events] == [3, 7]
    assert rejected.errors is not None
    assert rejected.errors[0][0]["loc"] == ["body", "events", 3, "metadata", "a.b"]
    assert rejected.errors[1][0]["loc"][:4] == ["body", "events", 7, "name"]
    assert all(e["external_id"].startswith(ingestion.id_prefix) for e in rejected.events)
    assert seqs(meterline, customer) == [0, 1, 2, 4, 5, 6, 8, 9]


def test_a_body_over_the_server_limit_is_split(meterline: Server, customer: str):
    # ~12 MiB in one batch: meterline answers 413 (10 MiB), the client sends halves.
    pad = {f"k{j}": "y" * 500 for j in range(9)}
    proxy = FaultProxy(meterline.url, [])
    try:
        with Ingestion(
            meterline.token,
            base_url=proxy.url,
            max_batch_size=10_000,
            max_batch_bytes=16 * 1024 * 1024,
            flush_interval=60,
        ) as ingestion:
            for i in range(2700):
                ingestion.ingest(event(customer, i, metadata={"seq": i, **pad}))
            assert ingestion.flush(seconds_left())
    finally:
        proxy.close()
    assert len(proxy.bodies) == 3 and len(proxy.bodies[0]) > 10 * 1024 * 1024
    assert ingestion.stats().delivered == 2700
    with meterline.client() as client:
        params = {"external_customer_id": customer, "limit": 1}
        assert client.get("/v1/events/", params=params).json()["pagination"]["total_count"] == 2700


def test_what_no_retry_can_fix_is_reported(meterline: Server, customer: str):
    reports = Reports()
    proxy = FaultProxy(meterline.url, [])
    try:
        with Ingestion("not-a-token", base_url=proxy.url, on_error=reports) as ingestion:
            ingestion.ingest(event(customer, 0))
            assert ingestion.flush(seconds_left())
    finally:
        proxy.close()
    [failed] = reports.errors
    assert isinstance(failed, DeliveryFailed) and failed.status == 401
    assert len(proxy.bodies) == 1

    reports = Reports()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: no answer at all
    with Ingestion(
        meterline.token, base_url=dead, max_attempts=3, backoff_base=0.01, on_error=reports
    ) as ingestion:
        ingestion.ingest(event(customer, 1))
        assert ingestion.flush(seconds_left())
    [failed] = reports.errors
    assert isinstance(failed, DeliveryFailed) and "after 3 attempts" in str(failed)
    assert ingestion.stats().retries == 2


def test_close_reports_what_it_could_not_deliver(customer: str):
    reports = Reports()
    dead = f"http://127.0.0.1:{free_port()}"
    ingestion = Ingestion("t", base_url=dead, max_batch_size=2, on_error=reports)
    for i in range(5):
        ingestion.ingest(event(customer, i))
    # flush() is bounded (30 s unless told): the server down, it answers False and keeps them.
    assert inspect.signature(Ingestion.flush).parameters["timeout"].default == 30
    assert inspect.signature(AsyncIngestion.flush).parameters["timeout"].default == 30
    assert ingestion.flush(0.3) is False
    assert reports.events(Undelivered) == []
    started = time.monotonic()
    ingestion.close(timeout=0.5)
    assert time.monotonic() - started < 3
    assert sorted(e["metadata"]["seq"] for e in reports.events(Undelivered)) == list(range(5))
    assert ingestion.stats().failed == 5
    with pytest.raises(ClientClosed):
        ingestion.ingest(event(customer, 5))
    ingestion.close()  # again: nothing


def test_what_cannot_be_sent_is_refused_at_once():
    with Ingestion("t", base_url="http://127.0.0.1:1", flush_at_exit=False) as ingestion:
        for bad in (
            ["not", "a", "dict"],
            {"external_customer_id": "c"},  # no name
            {"name": "x"},  # no customer
            {"name": "x", "customer_id": "5b0c3d34-2f0c-4d54", "external_customer_id": "c"},
            {"name": "x", "external_customer_id": "c", "metadata": {"s": {1, 2}}},
            {"name": "x", "external_customer_id": "c", "timestamp": datetime(2026, 1, 1)},
            {"name": "x", "external_customer_id": "c", "metadata": {"pad": "x" * 5_000_000}},
        ):
            with pytest.raises(InvalidEvent):
                ingestion.ingest(bad)  # type: ignore[arg-type]
        assert ingestion.stats().recorded == 0


EXIT_SCRIPT = """
import asyncio, sys
from ingest.sdk import AsyncIngestion, Ingestion

url, token, customer = sys.argv[1:4]
# A long linger: nothing is sent before the interpreter exits; no close(), no flush().
sync = Ingestion(token, base_url=url, flush_interval=600)
for i in range(50):
    sync.ingest({"name": "exit", "external_customer_id": customer, "metadata": {"seq": i}})

async def main():
    client = AsyncIngestion(token, base_url=url, flush_interval=600)
    for i in range(50, 80):
        client.ingest({"name": "exit", "external_customer_id": customer, "metadata": {"seq": i}})

asyncio.run(main())  # the loop ends with the async client's events still queued
"""


@pytest.mark.processes
def test_events_are_delivered_at_interpreter_exit(meterline: Server, customer: str):
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, meterline.url, meterline.token or "", customer],
        capture_output=True,
        text=True,
        timeout=seconds_left(),
        cwd=Path(__file__).parents[3],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert seqs(meterline, customer) == list(range(80))
