"""The embedded publisher: the ingest edge's `Publisher` in the core's own process, where a
request is durable once the store's group commit logs it (`store.ingest_log`), no broker."""

from __future__ import annotations

from collections import Counter

from aggregator.store import IngestJob, Store, with_origin
from ingest.publish import Progress, PublishResult
from ingest.validation import ValidationPool
from meters.ipc import Encoded
from meters.pricing import Pricing


class EmbeddedPublisher:
    """Validates (in the pool, or inline for small bodies) and applies in the store."""

    def __init__(self, store: Store, validation: ValidationPool) -> None:
        self._store = store
        self._validation = validation

    async def publish(
        self,
        organization_id: str,
        body: bytes,
        received_at_us: int,
        progress: Progress | None = None,
        pricing: Pricing | None = None,
    ) -> PublishResult:
        progress = progress or Progress()
        unpriced: Counter[str] = Counter()
        encoded = await self._validation.validate(body, received_at_us, Encoded, pricing, unpriced)
        events = encoded.events
        origin = with_origin(events, organization_id, received_at_us)
        progress.waiting_for = "the evaluation of its organization's meters"
        prepared = await self._store.prepare(organization_id, origin)
        job = IngestJob(organization_id, events, received_at_us, encoded.data, prepared)
        progress.waiting_for = "the writer to commit it"
        result = await self._store.write(
            job, weight=max(1, events.num_rows), tenant=organization_id
        )
        return PublishResult(result.inserted, result.duplicates, unpriced)

    async def dead_letter(self, organization_id: str, letters: list[tuple[str, bytes]]) -> None:
        return None  # embedded has no dead-letter topic
