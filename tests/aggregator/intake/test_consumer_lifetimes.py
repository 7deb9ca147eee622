"""The consumer's Kafka lifetime on its failure paths: a start that fails halfway stops what
it started, and is tried again; dead letters not acknowledged in time fail the batch (read
again, never committed without them)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from aggregator.intake import consumer as consumer_module
from aggregator.intake.consumer import Consumer
from aggregator.intake.decode import DeadLetter
from aggregator.intake.leadership import Role
from aggregator.intake.splits import Splits
from ingest.kafka import KafkaSettings
from meters.events import EventRules
from tests.deadline import until
from tests.kafka_clients import BOUND, Client, no_topics, settings


async def _nothing() -> dict[int, int]:
    return {}


def _consumer(monkeypatch: pytest.MonkeyPatch, kafka: Client, dead: Client) -> Consumer:
    monkeypatch.setattr(consumer_module, "ensure_topics", no_topics)
    monkeypatch.setattr(KafkaSettings, "reader", lambda self, **o: kafka)
    monkeypatch.setattr(KafkaSettings, "producer", lambda self, **o: dead)
    # Read at start: what this data dir's shard applied (nothing); not reached after.
    store: Any = type("Store", (), {"read": lambda self, read, *args: _nothing()})()
    journal: Any = type("Journal", (), {"follow": lambda self, topic, follower: None})()
    kafka_settings = settings()
    splits = Splits(kafka_settings.shard)
    return Consumer(
        store, kafka_settings, EventRules(), lambda org: True, journal, Role(True), splits
    )


def test_a_consumer_whose_start_fails_halfway_stops_what_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka, dead = Client(), Client(fail="start")
    consumer = _consumer(monkeypatch, kafka, dead)

    async def run() -> None:
        async with consumer:  # failed, and tried again after a pause
            await until("a second start of the consumer", lambda: len(dead.calls) >= 4)

    asyncio.run(run())
    assert kafka.calls[:4] == ["start", "stop", "start", "stop"]
    assert dead.calls[:4] == ["start", "stop", "start", "stop"]
    assert consumer._decoder._shutdown  # the decoding thread is gone too


def test_dead_letters_not_acknowledged_in_time_fail_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the bound the batch is read again (checkpoint step 7), never committed without
    its dead letters."""
    dead = Client(hang="send")
    consumer = _consumer(monkeypatch, Client(), dead)
    consumer._dead_letters = dead
    record: Any = type(
        "Record", (), {"topic": "t", "partition": 0, "offset": 3, "key": b"k", "value": b"{"}
    )()
    record.headers = []

    async def run() -> None:
        await consumer._dead_letter([(record, DeadLetter(0, "value: not JSON"))])

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(run())
    assert time.monotonic() - started < BOUND + 1.0
    assert dead.calls == ["send"]
