"""Where validated events go: the port every publisher implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meters.events import Event

__all__ = ["PublishResult", "Publisher"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    inserted: int
    duplicates: int


class Publisher(Protocol):
    async def publish(self, organization_id: str, events: Sequence[Event]) -> PublishResult:
        """Make `events` durable; return only once they are (no 2xx before durability).

        Raises:
            ValidationFailed: a rule needing stored state failed (unknown customer, ...).
            Unavailable: durability cannot be reached within the deadline; safe to retry.
        """
        ...
