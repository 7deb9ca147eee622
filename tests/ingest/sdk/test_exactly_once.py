"""Each recorded event is stored exactly once: through a server killed and restarted under
load, and (property) through any sequence of records, failures and flushes."""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.sdk import Ingestion
from tests.deadline import seconds_left, wait_for
from tests.faults import FaultProxy
from tests.ingest.sdk.conftest import Reports, stored
from tests.processes import MeterlineServer, Server
from tests.strategies import examples

pytestmark = pytest.mark.slow


def _counts(server: Server, customer: str) -> collections.Counter[int]:
    return collections.Counter(e["metadata"]["seq"] for e in stored(server, customer))


@pytest.mark.processes
def test_a_server_that_fails_then_recovers(tmp_path: Path):
    customer = "recovers"
    reports = Reports()
    first = MeterlineServer(tmp_path / "data").start()
    ingestion = Ingestion(
        first.token,
        base_url=first.url,
        max_batch_size=100,
        flush_interval=0.05,
        backoff_max=0.5,
        timeout=2.0,
        max_queue_size=100_000,
        on_error=reports,
    )
    recorded = 0
    stop = threading.Event()

    def record() -> None:  # the application goes on recording all along, 2,000 events/s
        nonlocal recorded
        while not stop.is_set():
            for _ in range(20):
                ingestion.ingest(
                    {
                        "name": "call",
                        "external_customer_id": customer,
                        "metadata": {"seq": recorded},
                    }
                )
                recorded += 1
            time.sleep(0.01)  # pacing the application's load

    recorder = threading.Thread(target=record)
    recorder.start()
    second: Server | None = None
    try:
        wait_for("the first server to store events", lambda: ingestion.stats().delivered >= 200)
        first.kill()  # mid-batch: some requests die unanswered after being stored, or not
        down_at = recorded
        time.sleep(1.0)  # the point: the application records on while no server answers
        second = MeterlineServer(tmp_path / "data")
        second.port, second.url = first.port, first.url  # the same server, back
        second.start()
        back_at = ingestion.stats().delivered
        wait_for(
            "the second server to store events",
            lambda: ingestion.stats().delivered >= back_at + 200,
        )
        stop.set()

        recorder.join()
        assert ingestion.flush(seconds_left())
        ingestion.close()
        assert recorded > down_at > 0
        counts = _counts(second, customer)
    finally:
        stop.set()
        first.kill()
        if second is not None:
            second.kill()
    assert reports.errors == []
    assert ingestion.stats().retries > 0
    assert sorted(counts) == list(range(recorded))
    assert set(counts.values()) == {1}


@pytest.fixture(scope="module")
def proxy(meterline: Server) -> Iterator[FaultProxy]:
    # Retry-After: 0 keeps examples fast; test_client holds the client to a real Retry-After.
    faults = FaultProxy(meterline.url, [], retry_after="0", stall_seconds=0.5)
    yield faults
    faults.close()


FAULTS = st.sampled_from(["500", "503", "429", "reset", "drop", "stall"])
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(1, 15)),
        st.tuples(st.just("fault"), FAULTS),
        st.tuples(st.just("flush"), st.none()),
    ),
    min_size=1,
    max_size=8,
).filter(lambda steps: sum(1 for kind, _ in steps if kind == "fault") <= 4)


@settings(max_examples=examples(20))  # each runs real requests: ~0.5 s
@given(steps=STEPS, batch=st.sampled_from([1, 7, 50]), in_flight=st.sampled_from([1, 3]))
def test_each_recorded_event_is_stored_once(
    meterline: Server,
    proxy: FaultProxy,
    steps: list[tuple[str, object]],
    batch: int,
    in_flight: int,
):
    customer = f"prop-{uuid.uuid4().hex[:12]}"
    reports = Reports()
    proxy.script.clear()
    recorded = 0
    with Ingestion(
        meterline.token,
        base_url=proxy.url,
        max_batch_size=batch,
        max_in_flight=in_flight,
        flush_interval=0.05,
        timeout=0.3,  # a stall (0.5 s) outlasts it: the request is sent again
        backoff_base=0.01,
        backoff_max=0.05,
        on_error=reports,
        flush_at_exit=False,
    ) as ingestion:
        for kind, value in steps:
            if kind == "record":
                assert isinstance(value, int)
                for _ in range(value):
                    event = {"seq": recorded}
                    ingestion.ingest(
                        {"name": "prop", "external_customer_id": customer, "metadata": event}
                    )
                    recorded += 1
            elif kind == "fault":
                proxy.script.append(str(value))  # the next request meets it
            else:
                assert ingestion.flush(seconds_left())
    assert reports.errors == []
    counts = _counts(meterline, customer)
    assert sorted(counts) == list(range(recorded))
    assert set(counts.values()) <= {1}
