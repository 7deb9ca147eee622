"""The publisher's Kafka lifetime on its failure paths: a start that fails halfway stops what it
started, a stop that hangs is abandoned within its bound; a producer's start on a broker
without idempotent producers (`start_producer`).

The failures are injected between two steps of a start (or into a stop), which a real broker
cannot be made to do on cue: the clients here are stand-ins that record what was called. The
pipeline tests run the same code against the Tansu broker."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError, UnknownError

from ingest.kafka import KafkaSettings, start_producer, stop_within
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


class _Producer(Client):
    """A producer whose start fails as the broker answers it: `refusal` if it is idempotent
    (Tansu fails its InitProducerId with UnknownError), `error` whatever it is."""

    def __init__(
        self, idempotent: bool, refusal: KafkaError, error: KafkaError | None = None
    ) -> None:
        super().__init__()
        self.idempotent, self._refusal, self._error = idempotent, refusal, error

    async def start(self) -> None:
        self.calls.append("start")
        if self._error is not None:
            raise self._error
        if self.idempotent:
            raise self._refusal


def _producers(monkeypatch: pytest.MonkeyPatch, error: KafkaError | None = None) -> list[_Producer]:
    made: list[_Producer] = []

    def producer(self: KafkaSettings, **overrides: object) -> _Producer:
        idempotent = bool(overrides.get("enable_idempotence", self.idempotent))
        made.append(_Producer(idempotent, UnknownError(), error))
        return made[-1]

    monkeypatch.setattr(KafkaSettings, "producer", producer)
    return made


def test_a_broker_without_idempotent_producers_gets_plain_ones_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first producer tries idempotence and, refused by a broker that answers, starts
    without; the next, of a copy of the settings, starts without at once; one warning."""
    made = _producers(monkeypatch)
    kafka = settings()

    async def run() -> list[object]:
        return [await start_producer(kafka), await start_producer(replace(kafka, linger_ms=0))]

    with caplog.at_level(logging.WARNING, "ingest.kafka"):
        started = asyncio.run(run())
    assert [p.idempotent for p in made] == [True, False, False]
    assert started == made[1:]
    assert made[0].calls == ["start", "stop"]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "ingest.kafka"]
    assert "starts no idempotent producer (UnknownError" in warning
    assert not kafka.idempotent and kafka.idempotence  # learned, not asked otherwise


def test_a_broker_that_does_not_answer_is_not_taken_for_one_without_idempotence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unreachable: the error raised (`retrying` tries again), idempotence still asked."""
    made = _producers(monkeypatch, KafkaConnectionError("Unable to bootstrap"))
    kafka = settings()
    with pytest.raises(KafkaConnectionError):
        asyncio.run(start_producer(kafka))
    assert [p.idempotent for p in made] == [True]
    assert kafka.idempotent
