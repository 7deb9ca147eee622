"""The publisher's Kafka lifetime on its failure paths: a start that fails halfway stops what it
started, a stop that hangs is abandoned within its bound.

The failures are injected between two steps of a start (or into a stop), which a real broker
cannot be made to do on cue: the clients here are stand-ins that record what was called. The
pipeline tests run the same code against the Tansu broker."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.errors import KafkaError

from ingest.kafka import KafkaSettings, stop_within
from ingest.publish import kafka_publisher as publisher_module
from ingest.publish.kafka_publisher import KafkaPublisher
from ingest.validation import ValidationPool
from meters.events import EventRules
from tests.kafka_clients import BOUND, Client, no_topics, settings


def _publisher(monkeypatch: pytest.MonkeyPatch, producer: Client) -> KafkaPublisher:
    monkeypatch.setattr(publisher_module, "ensure_topics", no_topics)
    monkeypatch.setattr(KafkaSettings, "producer", lambda self, **o: producer)
    return KafkaPublisher(settings(), ValidationPool(EventRules(), workers=0))


def test_a_publisher_whose_start_fails_halfway_stops_its_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    producer = Client(fail="partitions_for")

    async def run() -> None:
        async with _publisher(monkeypatch, producer):
            pass

    with pytest.raises(KafkaError, match="partitions_for failed"):
        asyncio.run(run())
    assert producer.calls == ["start", "partitions_for", "stop"]


def test_a_publisher_stop_that_hangs_is_abandoned_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    producer = Client(hang="stop")

    async def run() -> float:
        async with _publisher(monkeypatch, producer):
            started = time.monotonic()
        return time.monotonic() - started

    assert asyncio.run(run()) < BOUND + 1.0
    assert producer.calls == ["start", "partitions_for", "stop"]


def test_stop_within_logs_a_failing_stop_instead_of_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asyncio.run(stop_within(Client(fail="stop").stop, BOUND, "producer"))
    assert "stopping the Kafka producer failed" in caplog.text
