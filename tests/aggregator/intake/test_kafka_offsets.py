"""A topic whose log loses the core's stored offsets (deleted and recreated under load): the core
notices, says so loudly (log, /metrics, /healthz) and applies every record acknowledged after
the recreation exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from aggregator.store import Store
from aggregator.store.apply.consumed import OffsetReset, Reset, offset_resets, stored_offsets
from tests.deadline import seconds_left, wait_for
from tests.pipeline import Pipeline, send_until_accepted

TOPIC = "meterline.events"


def test_a_reset_applies_only_to_the_offset_it_saw(tmp_path: Path) -> None:
    asyncio.run(_reset_job(tmp_path))


async def _reset_job(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb") as store:
        await store.write(
            lambda tx: tx.con.execute("INSERT INTO kafka_offsets VALUES (?, 0, 5000)", [TOPIC])
        )
        stale = Reset(TOPIC, 0, 4000, 0, 120, None, 1)
        # The offset moved: nothing done.
        assert await store.write(OffsetReset(stale)) is None
        assert await store.read(stored_offsets, TOPIC) == {0: 5000}
        truncated = Reset(TOPIC, 0, 5000, 5200, 9000, 200, 2)
        assert await store.write(OffsetReset(truncated)) == truncated
        assert await store.read(stored_offsets, TOPIC) == {0: 5200}
        assert store.applied_offsets(TOPIC) == {0: 5200}  # and the consumer's check follows
        assert await store.read(offset_resets, TOPIC) == [truncated]


def _batch(customer: str, size: int, keyed: bool = False) -> list[dict[str, Any]]:
    """Without external_ids (`keyed`), a record applied twice counts twice; with them, a
    client's retry of a request that was in fact published is safe."""
    return [
        {
            "name": "use",
            "external_customer_id": customer,
            "metadata": {"tokens": 1 + i % 5},
            **({"external_id": f"{customer}-{i}"} if keyed else {}),
        }
        for i in range(size)
    ]


def _total(batch: list[dict[str, Any]]) -> int:
    return sum(int(e["metadata"]["tokens"]) for e in batch)


async def _recreate(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([TOPIC])
        # A moment for the deletion to take: a producer's write may create the topic again
        # first (below), a new log either way.
        await asyncio.sleep(0.3)
        try:
            await admin.create_topics([NewTopic(TOPIC, 1, 1)])
        except TopicAlreadyExistsError:
            pass  # a producer's write created it again first
    finally:
        await admin.close()


@pytest.mark.processes
def test_recreated_topic_under_load_loses_nothing_acknowledged_after(tmp_path: Path) -> None:
    with Pipeline(tmp_path, partitions=1) as pipeline:
        meter_id = pipeline.create_meter()
        core = pipeline.core
        assert core is not None
        sent: list[tuple[list[dict[str, Any]], float]] = []  # (batch, acknowledged at)
        with pipeline.edges[0].client(pipeline.token()) as client:
            # Before: 6,000 records applied, so the stored offset is far ahead of the new log.
            for i in range(30):
                batch = _batch(f"before-{i}-{uuid.uuid4().hex[:6]}", 200)
                send_until_accepted(client, batch)
                sent.append((batch, time.monotonic()))
            pipeline.wait_for_events(6000)

            stop, recreated = threading.Event(), threading.Event()

            def load() -> None:
                with pipeline.edges[0].client(pipeline.token()) as loader:
                    i = 0
                    while not stop.is_set():
                        # Requests around the recreation may be retried: keyed.
                        batch = _batch(f"during-{i}", 20, keyed=not recreated.is_set())
                        send_until_accepted(loader, batch)
                        sent.append((batch, time.monotonic()))
                        i += 1
                        time.sleep(0.05)  # pacing the load

            sender = threading.Thread(target=load)
            sender.start()
            wait_for("batches acknowledged under load", lambda: len(sent) >= 40)
            asyncio.run(_recreate(pipeline.broker.bootstrap))
            recreated_at = time.monotonic()
            recreated.set()
            wait_for(
                "more than 10 batches acknowledged after the recreation",
                lambda: sum(at > recreated_at for _, at in list(sent)) > 10,
            )
            stop.set()
            sender.join(seconds_left())

        after = [b for b, at in sent if at > recreated_at]
        assert len(after) > 10
        with core.client(pipeline.token()) as client:
            wait_for(
                "every batch acknowledged after the recreation to be applied",
                lambda: all(
                    pipeline.quantity(meter_id, external_customer_id=b[0]["external_customer_id"])
                    == _total(b)
                    for b in after
                ),
            )

            for batch, _ in sent:
                got = pipeline.quantity(
                    meter_id, external_customer_id=batch[0]["external_customer_id"]
                )
                # Exactly once if applied before or acknowledged after the recreation; in
                # between, applied or lost with the old log, never doubled.
                exact = batch in after or batch[0]["external_customer_id"].startswith("before")
                assert got in ((_total(batch),) if exact else (0, _total(batch)))
            health = client.get("/healthz").json()
            assert health["status"] == "degraded", health
            # Once, or more when a producer's write created the topic again before the test's
            # own create did (each new log is a reset).
            resets = health["kafka"]["offset_resets"]
            last = health["kafka"]["last_offset_reset"]
            assert resets >= 1 and last["partition"] == 0, health
            assert last["log_end"] < last["stored_offset"] and last["vanished"] is None
            metrics = client.get("/metrics").text
            assert f'meterline_kafka_offset_resets_total{{partition="0"}} {resets}' in metrics
