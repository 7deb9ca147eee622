"""The organization's dead letters (Kafka mode): the records the core refused, newest first."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aggregator.intake.consumer import OrganizationCounts
from aggregator.intake.dead_letters import DeadLetter, read_recent
from ingest.kafka import KafkaSettings

__all__ = ["DeadLetter", "DeadLetters", "OrganizationCounts", "recent"]


@dataclass(frozen=True, slots=True)
class DeadLetters:
    kafka: bool  # False: the embedded pipeline, which has no dead-letter topic
    letters: list[DeadLetter]
    complete: bool  # the whole topic was read: no older dead letter was left out
    counts: OrganizationCounts | None  # since the core started; None: no consumer here


async def recent(
    kafka: KafkaSettings | None,
    organization_id: str,
    limit: int,
    counts: Mapping[str, OrganizationCounts] | None = None,
) -> DeadLetters:
    """The organization's newest `limit` dead letters among the newest records of the topic;
    never another organization's, nor those of no organization. With `counts` (the consumer's),
    the organization's applied and dead-lettered counts."""
    if kafka is None:
        return DeadLetters(False, [], True, None)
    scan = await read_recent(kafka)
    mine = [d for d in scan.letters if d.organization_id == organization_id]
    # .get: the consumer's mapping adds what is read missing.
    own = None if counts is None else counts.get(organization_id) or OrganizationCounts()
    return DeadLetters(True, mine[:limit], scan.complete, own)
