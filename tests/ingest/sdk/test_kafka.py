"""Kafka direct: the SDK writes columnar records as an edge does (partition, headers, value) to a
real broker; a real core applies them, each external_id once, and events that break a rule are
reported by the SDK instead of being dead-lettered."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from ingest.sdk import AsyncIngestion, EventsRejected, Ingestion
from ingest.sdk.kafka import AsyncKafkaTransport, KafkaTransport
from meters import columnar
from tests.deadline import seconds_left
from tests.ingest.sdk.conftest import Reports, stored
from tests.pipeline import Pipeline

pytestmark = pytest.mark.processes


async def _first_record(bootstrap: str) -> tuple[bytes, columnar.Columnar | str]:
    consumer = AIOKafkaConsumer(
        "meterline.events",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                record = batch[0]
                return record.key, columnar.read(record.value, list(record.headers))
    finally:
        await consumer.stop()
    raise AssertionError("no record on the topic")


def test_records_are_applied_once(tmp_path: Path):
    customer = "kafka-c1"  # one customer: one key, one partition, so records stay in order
    reports = Reports()
    with Pipeline(tmp_path, partitions=3, edges=0) as pipeline:
        assert pipeline.core is not None
        org = pipeline.organization_id()
        transport = KafkaTransport(pipeline.broker.bootstrap, org, idempotence=False)
        with Ingestion(
            transport=transport, max_batch_size=40, flush_interval=60, on_error=reports
        ) as ingestion:
            ids = []
            for i in range(100):
                ids.append(
                    ingestion.ingest(
                        {"name": "k", "external_customer_id": customer, "metadata": {"seq": i}}
                    )
                )
                if i == 50:  # breaks a rule: reported here, never on the topic
                    bad = {"name": "k", "external_customer_id": customer, "metadata": {"a.b": 1}}
                    ingestion.ingest(bad)
            assert ingestion.flush(seconds_left())
            for i in range(10):  # a retry of an event already sent: the core applies it once
                again = {"seq": i, "retry": True}
                ingestion.ingest(
                    {
                        "name": "k",
                        "external_customer_id": customer,
                        "external_id": ids[i],
                        "metadata": again,
                    }
                )
            assert ingestion.flush(seconds_left())

        async def more() -> None:
            transport = AsyncKafkaTransport(pipeline.broker.bootstrap, org, idempotence=False)
            async with AsyncIngestion(transport=transport, on_error=reports) as ingestion:
                for i in range(100, 120):
                    ingestion.ingest(
                        {"name": "k", "external_customer_id": customer, "metadata": {"seq": i}}
                    )

        asyncio.run(more())
        pipeline.wait_for_events(120)
        key, value = asyncio.run(_first_record(pipeline.broker.bootstrap))
        events = stored(pipeline.core, customer)
    assert key == org.encode()
    assert isinstance(value, columnar.Columnar), value
    assert value.organization_id == org
    assert value.events.column("external_customer_id").to_pylist()[0] == customer
    assert sorted(e["metadata"]["seq"] for e in events) == list(range(120))
    assert not any(e["metadata"].get("retry") for e in events)  # the first write won
    [rejected] = reports.errors
    assert isinstance(rejected, EventsRejected)
    assert rejected.errors is not None
    assert rejected.errors[0][0]["loc"][3:] == ["metadata", "a.b"]


def test_a_broker_without_idempotent_producers_gets_a_plain_one_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu starts no idempotent producer (aiokafka retries its InitProducerId for ever): the
    transport says so once and produces without idempotence, so flush() returns and every
    event is applied (each has an external_id: one written twice is applied once)."""
    customer = "plain-c1"
    with Pipeline(tmp_path, partitions=3, edges=0) as pipeline:
        assert pipeline.core is not None
        org = pipeline.organization_id()
        transport = KafkaTransport(pipeline.broker.bootstrap, org, timeout=3)  # idempotence on
        with (
            caplog.at_level(logging.WARNING, "ingest.sdk.kafka"),
            Ingestion(transport=transport, flush_interval=60) as ingestion,
        ):
            for i in range(20):
                ingestion.ingest(
                    {"name": "k", "external_customer_id": customer, "metadata": {"seq": i}}
                )
            assert ingestion.flush(seconds_left())
        pipeline.wait_for_events(20)
        assert sorted(e["metadata"]["seq"] for e in stored(pipeline.core, customer)) == list(
            range(20)
        )
    [warning] = [r for r in caplog.records if "no idempotent producer" in r.getMessage()]
    assert "producing without idempotence" in warning.getMessage()
