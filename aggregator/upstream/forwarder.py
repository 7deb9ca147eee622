"""The forwarder: sends one organization's accepted events (raw, or as per-period rollups; see
aggregator.upstream.outboxes) to an upstream `/v1/events/ingest`, never dropping or doubling one.

The outbox's items go in its order (raw events in seq order, so in order per customer), in
batches bounded by count and bytes, at most `rate_per_minute` requests per minute (evenly
spaced). Nothing is marked sent before a 2xx that counts every event of the batch; anything
else re-sends the same batch (the upstream deduplicates on external_id): after Retry-After on
429/503, after a jittered exponential backoff on other 5xx, timeouts and connection errors. A
422 quarantines exactly the events it names (split in halves when it names none) and the rest
are sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Self

import httpx

from aggregator.errors import NotLeading, UsageError
from aggregator.intake.leadership import Role
from aggregator.settings import ForwarderSettings
from aggregator.store import Pending, Store
from aggregator.upstream.outboxes import Outbox, RawOutbox, RollupOutbox
from aggregator.upstream.progress import Progress
from ingest.tasks import cancel_within
from meters.polar_api import PolarApi
from meters.upstream import Accepted, Rejected, RetryLater, backoff

log = logging.getLogger(__name__)


class Forwarder:
    """Runs in the background while open and this core leads. An async context manager."""

    def __init__(
        self,
        store: Store,
        organization_id: str,
        settings: ForwarderSettings,
        *,
        progress: Progress | None = None,
        role: Role | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`progress`: how the outbox records the upstream's answers (None: in the store
        alone); `role`: forwards only while this core leads (None: always)."""
        self._outbox = _outbox(settings, store, organization_id, progress or Progress(store))
        self._role = role or Role(leading=True)
        self._settings = settings
        self.mode = settings.mode
        # The client spaces its requests evenly: never more than the rate in any minute.
        self._client = PolarApi(
            settings.url,
            settings.token,
            rate_per_minute=settings.rate_per_minute,
            timeout_seconds=settings.timeout_seconds,
            transport=transport,
            # A leader paused past its lease sends nothing once resumed (`leadership`, step 6).
            before_send=self._leading,
        )
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.retried = 0
        self.refused = 0  # events quarantined since start
        self.last_error: str | None = None

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._client)
            self._task = asyncio.create_task(self._run(), name="forwarder")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # In-flight requests are abandoned: the batch is re-sent on the next start.
        await cancel_within(self._task, what="forwarder")
        await self._stack.aclose()

    async def backlog(self) -> int:
        return await self._outbox.backlog()

    async def quarantined(self, seq: int | None = None) -> list[tuple[Pending, str]]:
        return await self._outbox.quarantined(seq)

    async def _run(self) -> None:
        while True:
            await self._role.until(True)
            try:
                batch = await self._outbox.next(self._settings.max_events)
                if not batch:
                    await asyncio.sleep(self._settings.idle_seconds)
                    continue
                batch = _within(batch, self._settings.max_bytes)
                await self._outbox.done(batch, await self._deliver(batch))
            except asyncio.CancelledError:
                raise
            except NotLeading:  # held back, or its answer not recorded: the leader sends it
                continue
            except Exception:
                log.exception("forwarding failed; retrying")
                await asyncio.sleep(self._settings.max_backoff_seconds)

    async def _deliver(self, batch: list[Pending]) -> list[Pending]:
        """Until the upstream holds every event of `batch` that it does not refuse; those."""
        attempt = 0
        while batch:
            outcome = await self._client.send([p.event for p in batch])
            if isinstance(outcome, Accepted):
                self.sent += len(batch)
                return batch
            if isinstance(outcome, RetryLater):
                self.retried += 1
                self.last_error = outcome.reason
                attempt += 1
                await asyncio.sleep(
                    outcome.seconds
                    if outcome.seconds is not None
                    else backoff(attempt, self._settings.max_backoff_seconds)
                )
                continue
            assert isinstance(outcome, Rejected)
            if not outcome.reasons and len(batch) > 1:
                # The upstream did not say which: find them half by half.
                half = len(batch) // 2
                return await self._deliver(batch[:half]) + await self._deliver(batch[half:])
            refused = outcome.reasons or {0: "rejected by the upstream (no detail)"}
            await self._quarantine([(batch[i].seq, reason) for i, reason in refused.items()])
            batch = [p for i, p in enumerate(batch) if i not in refused]
        return batch

    async def _quarantine(self, refused: list[tuple[int, str]]) -> None:
        for seq, reason in refused:
            log.warning("upstream refused event seq %d: %s (quarantined)", seq, reason)
        await self._outbox.quarantine(refused)
        self.refused += len(refused)

    async def resend(self, seq: int) -> str:
        """Send one quarantined event again; release it if the upstream takes it now."""
        self._leading()
        found = [p for p, _ in await self._outbox.quarantined(seq)]
        if not found:
            return "not quarantined"
        outcome = await self._client.send([found[0].event])
        if isinstance(outcome, Accepted):
            await self._outbox.release(seq)
            return "accepted"
        if isinstance(outcome, Rejected):
            reason = outcome.reasons.get(0, "rejected by the upstream (no detail)")
            await self._outbox.quarantine([(seq, reason)])
            return f"rejected: {reason}"
        return f"not sent: {outcome.reason}"

    async def resend_events(self, event_ids: list[str]) -> dict[str, int]:
        """Send these events again (raw mode; reconcile's repair). Safe: the upstream
        deduplicates on their external_ids, which are the ones the outbox sends."""
        if not isinstance(self._outbox, RawOutbox):
            raise UsageError("rollup mode forwards no raw events to re-send")
        self._leading()
        found = await self._outbox.events(event_ids)
        accepted, rest = 0, found
        while rest:
            batch = _within(rest[: self._settings.max_events], self._settings.max_bytes)
            accepted += len(await self._deliver(batch))
            rest = rest[len(batch) :]
        return {
            "requested": len(event_ids),
            "found": len(found),
            "accepted": accepted,
            "refused": len(found) - accepted,
        }

    def _leading(self) -> None:
        if not self._role.leading:
            raise NotLeading("this core follows: the leader forwards (ask it)")


def _within(batch: list[Pending], max_bytes: int) -> list[Pending]:
    """The longest prefix of `batch` whose request fits in `max_bytes` (at least one event)."""
    total = 0
    for i, pending in enumerate(batch):
        total += pending.size + 1
        if total > max_bytes and i > 0:
            return batch[:i]
    return batch


def _outbox(
    settings: ForwarderSettings, store: Store, organization_id: str, progress: Progress
) -> Outbox:
    if settings.mode == "raw":
        return RawOutbox(store, organization_id, settings.customer_map, progress)
    return RollupOutbox(
        store,
        organization_id,
        settings.customer_map,
        progress,
        period_minutes=settings.rollup_minutes,
        by_dimension=settings.rollup_by_dimension,
        settle_seconds=settings.settle_seconds,
        stage_every_seconds=settings.stage_every_seconds,
    )
