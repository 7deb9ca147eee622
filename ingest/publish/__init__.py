"""Where ingest bodies go once authenticated: the port every publisher implements."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from meters.pricing import Pricing

__all__ = ["Progress", "PublishResult", "Publisher"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    inserted: int
    duplicates: int
    # The `_llm` events without `_cost` that pricing could not price, per `<vendor>/<model>`.
    unpriced: Counter[str] = field(default_factory=Counter)
    # Kafka: (partition, the offset after the request's last record there), per partition its
    # records went to (`ingest.http.positions`); embedded, none (applied before the answer).
    positions: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class Progress:
    """What a request's publishing waits for now: named in the log line of a request that runs
    out of time (a publisher says so as it goes from one step to the next)."""

    waiting_for: str = "its validation"


class Publisher(Protocol):
    async def publish(
        self,
        organization_id: str,
        body: bytes,
        received_at_us: int,
        progress: Progress | None = None,
        pricing: Pricing | None = None,
    ) -> PublishResult:
        """Validate the raw `{"events": [...]}` body and make its events durable; return only
        once they are (no 2xx before durability). `received_at_us` is the server's receive time:
        the events' `ingested_at`, and the default of their `timestamp`. `progress`, if
        given, is told what the request waits for at each step. `pricing`, if given, prices
        the `_llm` events without `_cost` as they are validated (`meters.pricing`).

        Raises:
            ValidationFailed: the body or an event broke a rule; nothing was stored.
            Unavailable: durability cannot be reached now; safe to retry.
        """
        ...

    async def dead_letter(self, organization_id: str, letters: list[tuple[str, bytes]]) -> None:
        """Keep what an ingest route refused in part (an OTLP export's spans), each as
        (reason, JSON record), where the organization's dead letters are read; nothing where a
        deployment has no dead-letter topic (embedded: the answer and `/metrics` say it)."""
        ...
