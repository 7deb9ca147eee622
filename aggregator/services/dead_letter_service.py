"""The organization's dead letters (Kafka mode): the records the core refused, newest first."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.intake.dead_letters import DeadLetter, read_recent
from ingest.kafka import KafkaSettings

__all__ = ["DeadLetter", "DeadLetters", "recent"]


@dataclass(frozen=True, slots=True)
class DeadLetters:
    kafka: bool  # False: the embedded pipeline, which has no dead-letter topic
    letters: list[DeadLetter]
    complete: bool  # the whole topic was read: no older dead letter was left out


async def recent(kafka: KafkaSettings | None, organization_id: str, limit: int) -> DeadLetters:
    """The organization's newest `limit` dead letters among the newest records of the topic;
    never another organization's, nor those of no organization."""
    if kafka is None:
        return DeadLetters(False, [], True)
    scan = await read_recent(kafka)
    mine = [d for d in scan.letters if d.organization_id == organization_id]
    return DeadLetters(True, mine[:limit], scan.complete)
