"""What the forwarder sends: raw events (the events table behind a cursor) or per-period rollups
(an outbox table staged from the meters' rollups). Both hand out batches in a fixed order and
hear back which were accepted and which the upstream refused."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

import orjson

from aggregator.store import Pending, Store
from aggregator.store import forward_rollups as rollup_sql
from aggregator.store import outbox as raw_sql
from aggregator.upstream.progress import Progress
from meters.times import now_us


class Outbox(Protocol):
    async def next(self, limit: int) -> list[Pending]: ...

    async def done(self, batch: list[Pending], accepted: list[Pending]) -> None:
        """The upstream holds `accepted`; the rest of `batch` is quarantined."""
        ...

    async def quarantine(self, refused: list[tuple[int, str]]) -> None: ...

    async def quarantined(self, seq: int | None = None) -> list[tuple[Pending, str]]: ...

    async def release(self, seq: int) -> None: ...

    async def backlog(self) -> int: ...


class RawOutbox:
    """Every user event, in seq order (so in order per customer)."""

    def __init__(
        self,
        store: Store,
        organization_id: str,
        customer_map: Mapping[str, str],
        progress: Progress,
    ):
        self._store = store
        self._org = organization_id
        self._map = customer_map
        self._progress = progress

    async def next(self, limit: int) -> list[Pending]:
        after = await self._store.read(raw_sql.cursor, self._org)
        batch = await self._store.read(raw_sql.pending, self._org, after, limit)
        return [self._mapped(p) for p in batch]

    async def events(self, event_ids: list[str]) -> list[Pending]:
        """These events as the upstream gets them (reconcile's repair re-sends them)."""
        return [
            self._mapped(p) for p in await self._store.read(raw_sql.by_ids, self._org, event_ids)
        ]

    def _mapped(self, pending: Pending) -> Pending:
        local = pending.event["external_customer_id"]
        upstream = self._map.get(local)
        if upstream is None:
            return pending
        event = {**pending.event, "external_customer_id": upstream}
        return replace(pending, event=event, size=len(orjson.dumps(event)))

    async def done(self, batch: list[Pending], accepted: list[Pending]) -> None:
        await self._progress.record(
            "raw.advance", self._org, batch[-1].seq, len(accepted), now_us()
        )

    async def quarantine(self, refused: list[tuple[int, str]]) -> None:
        await self._progress.record("raw.quarantine", self._org, refused, now_us())

    async def quarantined(self, seq: int | None = None) -> list[tuple[Pending, str]]:
        rows = await self._store.read(raw_sql.quarantined, self._org, seq)
        return [(self._mapped(p), reason) for p, reason in rows]

    async def release(self, seq: int) -> None:
        await self._progress.record("raw.release", self._org, seq)

    async def backlog(self) -> int:
        return await self._store.read(raw_sql.backlog, self._org)


class RollupOutbox:
    """One event per count or sum meter, customer and settled period (and per later change)."""

    def __init__(
        self,
        store: Store,
        organization_id: str,
        customer_map: Mapping[str, str],
        progress: Progress,
        *,
        period_minutes: int,
        settle_seconds: float,
        stage_every_seconds: float,
        by_dimension: bool = False,
    ) -> None:
        self._store = store
        self._org = organization_id
        self._map = customer_map
        self._progress = progress
        self._period_us = period_minutes * 60_000_000
        self._minutes = period_minutes
        self._by_dimension = by_dimension
        self._settle_us = int(settle_seconds * 1_000_000)
        self._every = stage_every_seconds
        self._staged_at = float("-inf")

    async def stage(self) -> int:
        """Freeze every settled period's change into the outbox; how many events that made."""
        now = now_us()
        cutoff = (now - self._settle_us) // self._period_us * self._period_us
        staged: int = await self._progress.record(
            "rollup.stage",
            self._org,
            self._minutes,
            cutoff,
            dict(self._map),
            now,
            *((True,) if self._by_dimension else ()),
        )
        self._staged_at = time.monotonic()
        return staged

    async def next(self, limit: int) -> list[Pending]:
        batch = await self._store.read(rollup_sql.pending, self._org, limit)
        if not batch and time.monotonic() - self._staged_at >= self._every:
            await self.stage()
            batch = await self._store.read(rollup_sql.pending, self._org, limit)
        return batch

    async def done(self, batch: list[Pending], accepted: list[Pending]) -> None:
        if accepted:
            seqs = [p.seq for p in accepted]
            await self._progress.record("rollup.sent", self._org, seqs, now_us())

    async def quarantine(self, refused: list[tuple[int, str]]) -> None:
        await self._progress.record("rollup.quarantine", self._org, refused, now_us())

    async def quarantined(self, seq: int | None = None) -> list[tuple[Pending, str]]:
        return await self._store.read(rollup_sql.quarantined, self._org, seq)

    async def release(self, seq: int) -> None:
        await self._progress.record("rollup.sent", self._org, [seq], now_us())

    async def backlog(self) -> int:
        return await self._store.read(rollup_sql.backlog, self._org)
