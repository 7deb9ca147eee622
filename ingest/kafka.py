"""The one Kafka module: its settings (`KafkaSettings`, which make the clients; declared with
the other settings in `ingest.settings`, which every command reads), the topics (created if
missing), waiting for a broker, and stopping clients within a bound. The edge's publisher, the
SDK's producer and the core's consumer all take them from here. (Which partition a record goes
to is `meters.columnar`'s.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.settings import KafkaSecurity as KafkaSecurity
from ingest.settings import KafkaSettings as KafkaSettings
from ingest.settings import Shard as Shard

log = logging.getLogger(__name__)


async def ensure_topics(settings: KafkaSettings) -> int:
    """Create the event, dead-letter, control, journal and lease topics if missing; verify their
    partition counts. Topics made by earlier versions gain the ones they lack. Returns the
    events topic's partition count (the topic's, whatever the settings say)."""
    admin = settings.admin()
    partitions = {
        settings.topic: settings.partitions,
        settings.dead_letter_topic: settings.partitions,
        settings.control_topic: 1,
        settings.journal_topic: 1,
        settings.lease_topic: 1,
    }
    wanted = list(partitions)
    try:
        async with asyncio.timeout(settings.start_timeout_seconds):
            await retrying(admin.start)
            for name, count in partitions.items():  # apart: one that exists fails no other
                try:
                    await admin.create_topics([NewTopic(name, count, settings.replication_factor)])
                except TopicAlreadyExistsError:
                    pass
            described = await admin.describe_topics(wanted)
    finally:
        await stop_within(admin.close, settings.stop_timeout_seconds, "admin client")
    [count] = [len(d.get("partitions", [])) for d in described if d["topic"] == settings.topic]
    if count != settings.partitions:
        log.warning(
            "topic %s has %d partitions, not the configured %d; using it as it is",
            settings.topic,
            count,
            settings.partitions,
        )
    return count


async def retrying(start: Any) -> None:
    """Call `start` until the broker answers (the caller bounds the wait)."""
    while True:
        try:
            await start()
            return
        except KafkaError as exc:
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(0.5)


async def stop_within(stop: Callable[[], Awaitable[Any]], seconds: float, what: str) -> None:
    """`stop()`, no longer waited for (and logged) if it takes longer than `seconds` or fails: a
    client that cannot leave cleanly must not hold up its owner. Past the bound it is left to
    finish in the background rather than cancelled: aiokafka marks a client closed as its stop
    begins, so a stop cut short would leave its tasks and connections behind for good."""
    stopping = asyncio.ensure_future(stop())
    try:
        async with asyncio.timeout(seconds):
            await asyncio.shield(stopping)
    except TimeoutError:
        log.error(
            "stopping the Kafka %s took over %.1f s; left to finish on its own", what, seconds
        )
    except Exception:
        log.exception("stopping the Kafka %s failed; abandoned", what)
