"""The Kafka pipeline end to end, with real processes: Tansu broker, ingest edges, core.

The oracle is a plain-Python fold over the events sent (`tests.pipeline.Oracle`)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.pipeline import Oracle, Pipeline, send_until_accepted, usage_batches


def _assert_matches_fold(pipeline: Pipeline, meter_id: str, oracle: Oracle) -> None:
    pipeline.wait_for_events(len(oracle.events))
    expected = oracle.tokens_by_customer()
    for customer, tokens in expected.items():
        assert pipeline.quantity(meter_id, external_customer_id=customer) == tokens, customer
    assert pipeline.quantity(meter_id) == sum(expected.values())


def test_events_through_two_edges_equal_the_fold(tmp_path: Path) -> None:
    with Pipeline(tmp_path, edges=2, workers=1) as pipeline:
        meter_id = pipeline.create_meter()
        oracle = Oracle()
        clients = [edge.client(pipeline.token()) for edge in pipeline.edges]
        for i, batch in enumerate(usage_batches(seed=11, batches=20, size=200, tag="two")):
            response = clients[i % 2].post("/v1/events/ingest", json={"events": batch})
            assert response.status_code == 200, response.text
            oracle.add(batch)
        for client in clients:
            client.close()
        _assert_matches_fold(pipeline, meter_id, oracle)


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_core_killed_at_random_points_loses_and_doubles_nothing(tmp_path: Path, seed: int) -> None:
    print(f"seed {seed}")  # the kill times follow from it
    rng = random.Random(seed)
    with Pipeline(tmp_path, edges=1) as pipeline:
        meter_id = pipeline.create_meter()
        oracle = Oracle()
        batches = list(usage_batches(seed=seed, batches=40, size=250, tag=f"kill{seed}"))
        done = threading.Event()

        def load() -> None:
            with pipeline.edges[0].client(pipeline.token()) as client:
                for batch in batches:
                    send_until_accepted(client, batch)
                    oracle.add(batch)
                    time.sleep(0.02)
            done.set()

        sender = threading.Thread(target=load)
        sender.start()
        kills = 0
        while not done.is_set() and kills < 3:
            time.sleep(rng.uniform(0.3, 1.5))
            pipeline.restart_core()  # SIGKILL, then a new process on the same data dir
            kills += 1
        sender.join(120)
        assert done.is_set() and kills >= 1
        _assert_matches_fold(pipeline, meter_id, oracle)


def test_poison_records_are_dead_lettered_and_the_partition_moves_on(tmp_path: Path) -> None:
    with Pipeline(tmp_path, partitions=1) as pipeline:
        meter_id = pipeline.create_meter()
        assert pipeline.core is not None
        org = pipeline.organization_id()
        good = {"organization_id": org, "name": "call", "external_customer_id": "c1"}
        poison: list[bytes | None] = [
            b"{not json",
            b"[]",
            orjson.dumps({**good, "organization_id": "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d11"}),
            orjson.dumps({**good, "name": ""}),
            orjson.dumps(
                {
                    "organization_id": org,
                    "name": "call",
                    "customer_id": "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d12",
                }
            ),
            orjson.dumps({**good, "metadata": {"tokens": 1, "pad": "x" * 2_000_000}}),
            None,
        ]
        valid = [
            orjson.dumps({**good, "external_id": f"ok-{i}", "metadata": {"tokens": i}})
            for i in range(1, 6)
        ]
        dead = asyncio.run(_produce_and_read_dead_letters(pipeline, [*poison, *valid], 7))
        assert [d[0] for d in dead] == list(range(7))  # each poison record, by offset
        reasons = [d[1] for d in dead]
        assert reasons[0].startswith("value: not JSON")
        assert reasons[1] == "value: not a JSON object"
        assert reasons[2] == "organization_id: no such organization"
        assert reasons[3].startswith("name:")
        assert reasons[4] == "customer_id: Customer not found."
        assert "byte limit" in reasons[5]
        assert reasons[6].startswith("value: missing")
        pipeline.wait_for_events(5)
        assert pipeline.quantity(meter_id) == 15


def test_an_event_dated_30_days_ago_is_applied(tmp_path: Path) -> None:
    with Pipeline(tmp_path) as pipeline:
        meter_id = pipeline.create_meter()
        day = (datetime.now(UTC) - timedelta(days=30)).replace(hour=12, minute=0, second=0)
        event = {
            "name": "late",
            "external_customer_id": "c1",
            "external_id": "late-1",
            "timestamp": day.isoformat(),
            "metadata": {"tokens": 42},
        }
        with pipeline.edges[0].client(pipeline.token()) as client:
            assert client.post("/v1/events/ingest", json={"events": [event]}).status_code == 200
        pipeline.wait_for_events(1)
        window = {
            "start_timestamp": day.replace(hour=0).isoformat(),
            "end_timestamp": day.replace(hour=23, minute=59).isoformat(),
            "interval": "day",
        }
        assert pipeline.quantity(meter_id, **window) == 42


async def _produce_and_read_dead_letters(
    pipeline: Pipeline, values: list[bytes | None], expected: int
) -> list[tuple[int, str]]:
    """Write `values` straight to the events topic (as any Kafka producer may), then read the
    dead-letter topic: (original offset, reason) of each dead letter."""
    producer = AIOKafkaProducer(
        bootstrap_servers=pipeline.broker.bootstrap, max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait("meterline.events", value=value, key=b"k", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "meterline.events.dead",
        bootstrap_servers=pipeline.broker.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 60
        while len(found) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    headers = {k: v.decode() for k, v in record.headers}
                    found.append((int(headers["meterline.offset"]), headers["meterline.reason"]))
    finally:
        await consumer.stop()
    return sorted(found)
