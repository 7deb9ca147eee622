"""The forwarder: sends one organization's accepted events to an upstream `/v1/events/ingest`,
never dropping or doubling one.

Events go in seq order (so in order per customer), in batches bounded by count and bytes, at
most `rate_per_minute` requests per minute (evenly spaced). The cursor moves only after a 2xx
that counts every event of the batch; anything else re-sends the same batch (the upstream
deduplicates on external_id): after Retry-After on 429/503, after a jittered exponential
backoff on other 5xx, timeouts and connection errors. A 422 quarantines exactly the events it
names (split in halves when it names none) and the rest are sent again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from aggregator.store import Store
from aggregator.store import outbox as sql
from meters.events import now_us
from meters.upstream import Accepted, Rejected, RetryLater, UpstreamClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    url: str
    token: str
    organization: str = "default"  # whose events go upstream (the token is that org's there)
    rate_per_minute: float = 500.0
    max_events: int = 1000
    max_bytes: int = 9 * 1024 * 1024  # under the upstream's 10 MiB, leaving room for framing
    timeout_seconds: float = 10.0
    idle_seconds: float = 0.5
    max_backoff_seconds: float = 30.0


class Forwarder:
    """Runs in the background while open. An async context manager."""

    def __init__(self, store: Store, organization_id: str, settings: ForwarderSettings) -> None:
        self._store = store
        self._org = organization_id
        self._settings = settings
        self._client = UpstreamClient(
            settings.url, settings.token, timeout_seconds=settings.timeout_seconds
        )
        self._task: asyncio.Task[None] | None = None
        self._next_request = 0.0
        self.sent = 0
        self.retried = 0
        self.quarantined = 0
        self.last_error: str | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="forwarder")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # In-flight requests are abandoned: the batch is re-sent on the next start.
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def backlog(self) -> int:
        return await self._store.read(sql.backlog, self._org)

    async def _run(self) -> None:
        while True:
            try:
                after = await self._store.read(sql.cursor, self._org)
                batch = await self._store.read(
                    sql.pending, self._org, after, self._settings.max_events
                )
                if not batch:
                    await asyncio.sleep(self._settings.idle_seconds)
                    continue
                batch = _within(batch, self._settings.max_bytes)
                await self._deliver(batch)
                await self._store.write(
                    sql.advance_job(self._org, batch[-1].seq, len(batch), now_us())
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("forwarding failed; retrying")
                await asyncio.sleep(self._settings.max_backoff_seconds)

    async def _deliver(self, batch: list[sql.Pending]) -> None:
        """Until the upstream holds every event of `batch` that it does not refuse."""
        attempt = 0
        while batch:
            await self._pace()
            outcome = await self._client.send([p.event for p in batch])
            if isinstance(outcome, Accepted):
                self.sent += len(batch)
                return
            if isinstance(outcome, RetryLater):
                self.retried += 1
                self.last_error = outcome.reason
                attempt += 1
                await asyncio.sleep(
                    outcome.seconds if outcome.seconds is not None else self._backoff(attempt)
                )
                continue
            assert isinstance(outcome, Rejected)
            if not outcome.reasons and len(batch) > 1:
                # The upstream did not say which: find them half by half.
                half = len(batch) // 2
                await self._deliver(batch[:half])
                await self._deliver(batch[half:])
                return
            refused = outcome.reasons or {0: "rejected by the upstream (no detail)"}
            await self._quarantine([(batch[i].seq, reason) for i, reason in refused.items()])
            batch = [p for i, p in enumerate(batch) if i not in refused]

    async def _quarantine(self, refused: list[tuple[int, str]]) -> None:
        for seq, reason in refused:
            log.warning("upstream refused event seq %d: %s (quarantined)", seq, reason)
        await self._store.write(sql.quarantine_job(self._org, refused, now_us()))
        self.quarantined += len(refused)

    async def resend(self, seq: int) -> str:
        """Send one quarantined event again; release it if the upstream takes it now."""
        found = [p for p, _ in await self._store.read(sql.quarantined, self._org, seq)]
        if not found:
            return "not quarantined"
        await self._pace()
        outcome = await self._client.send([found[0].event])
        if isinstance(outcome, Accepted):
            await self._store.write(sql.release_job(self._org, seq))
            return "accepted"
        if isinstance(outcome, Rejected):
            reason = outcome.reasons.get(0, "rejected by the upstream (no detail)")
            await self._store.write(sql.quarantine_job(self._org, [(seq, reason)], now_us()))
            return f"rejected: {reason}"
        return f"not sent: {outcome.reason}"

    async def _pace(self) -> None:
        """Evenly spaced requests: never more than `rate_per_minute` in any minute."""
        spacing = 60.0 / self._settings.rate_per_minute
        now = time.monotonic()
        wait = self._next_request - now
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_request = max(now, self._next_request) + spacing

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads out many forwarders retrying the same upstream.
        return random.uniform(0, min(self._settings.max_backoff_seconds, 0.5 * 2**attempt))


def _within(batch: list[sql.Pending], max_bytes: int) -> list[sql.Pending]:
    """The longest prefix of `batch` whose request fits in `max_bytes` (at least one event)."""
    total = 0
    for i, pending in enumerate(batch):
        total += pending.size + 1
        if total > max_bytes and i > 0:
            return batch[:i]
    return batch
