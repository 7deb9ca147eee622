"""Customer meters as each commit changes them, for the live stream
(`GET /v1/customer-meters/stream`).

The store tells the feed, right after each commit and on its writer thread, which customer
meters (meter id, customer reference) of the organizations someone listens to it changed
(`Live.changes`). The feed hands them to that organization's subscriptions on the event loop.
A subscription coalesces what is pending into a set bounded by `max_pending`: one that falls
further behind is told to reload (`Update.overflowed`) instead of queueing without bound, and
the writer never waits for a subscriber. Closing the feed ends every subscription, so that a
server stopping is not held open by its streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

import duckdb

from aggregator.store import (
    Changed,
    CustomerMeter,
    Store,
    TenantLimits,
    customers_by_refs,
    held_by_pair,
    held_customer_meter,
    quotas,
    subjects,
)
from meters.times import now_us

__all__ = [
    "CustomerMeter",
    "LiveFeed",
    "Subscription",
    "Update",
    "changed_balances",
    "customer_refs",
]

# Customer meters a subscription holds pending at most before it is told to reload instead.
MAX_PENDING = 10_000
Pair = tuple[str, str]  # (meter id, customer reference)


@dataclass(frozen=True, slots=True)
class Update:
    """What changed since the subscriber last looked; `overflowed`: more than it could hold
    (reload everything)."""

    pairs: frozenset[Pair]
    overflowed: bool


@dataclass(slots=True, eq=False)  # held in sets: by identity
class Subscription:
    """One stream's view of the feed: its organization, optionally narrowed to meters and to
    customer references."""

    meter_ids: frozenset[str]  # empty: every meter
    refs: frozenset[str] | None  # None: every customer
    max_pending: int
    ended: bool = False
    _pending: set[Pair] = field(default_factory=set)
    _overflowed: bool = False
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, pairs: set[Pair]) -> None:
        wanted = {
            (meter, ref)
            for meter, ref in pairs
            if (not self.meter_ids or meter in self.meter_ids)
            and (self.refs is None or ref in self.refs)
        }
        if not wanted:
            return
        if len(self._pending) + len(wanted) > self.max_pending:  # at most: no set copy
            self._pending.clear()
            self._overflowed = True
        else:
            self._pending |= wanted
        self._wake.set()

    def end(self) -> None:
        self.ended = True
        self._wake.set()

    async def next(self, within: float) -> Update | None:
        """What changed since the last call, once something has; None if `within` seconds
        pass first, or once the subscription has ended."""
        try:
            async with asyncio.timeout(within):
                await self._wake.wait()
        except TimeoutError:
            return None
        self._wake.clear()
        if self.ended:
            return None
        update = Update(frozenset(self._pending), self._overflowed)
        self._pending, self._overflowed = set(), False
        return update


class LiveFeed:
    """An async context manager: attached to the store's commits while open."""

    def __init__(
        self,
        store: Store,
        heartbeat_seconds: float,
        max_pending: int = MAX_PENDING,
        limits: TenantLimits | None = None,
    ) -> None:
        self._store = store
        self.heartbeat_seconds = heartbeat_seconds
        self._max_pending = max_pending
        self._limits = limits or quotas.DEFAULTS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: dict[str, set[Subscription]] = {}
        # Replaced, never changed in place: the writer thread reads it.
        self._watched: frozenset[str] = frozenset()
        self._closed = False
        self._detach: Callable[[], None] = lambda: None

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._detach = self._store.listeners.attach_changes(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._detach()
        self.close()

    def close(self) -> None:
        """End every subscription, and any made from now on (the server is stopping)."""
        self._closed = True
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.end()

    # ---- the store's side (writer thread) ------------------------------------------------

    def watched(self) -> Collection[str]:
        return self._watched

    def changed(self, changes: Changed) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._dispatch, changes)

    def _dispatch(self, changes: Changed) -> None:
        for org, pairs in changes.items():
            for subscription in self._subscriptions.get(org, ()):
                subscription.offer(pairs)

    # ---- the streams' side (event loop) ---------------------------------------------------

    def admit(self, organization_id: str) -> None:
        """LimitReached when the organization holds as many streams as it may: checked before
        a stream's answer begins (`subscribe` ends at once one that gets past it in a race)."""
        if self._full(organization_id):
            raise quotas.STREAMS.refused(self._limits)

    def _full(self, organization_id: str) -> bool:
        return len(self._subscriptions.get(organization_id, ())) >= self._limits.streams

    @contextlib.contextmanager
    def subscribe(
        self, organization_id: str, meter_ids: Collection[str], refs: frozenset[str] | None
    ) -> Iterator[Subscription]:
        subscription = Subscription(frozenset(meter_ids), refs, self._max_pending)
        if self._closed or self._full(organization_id):
            subscription.end()
        held = self._subscriptions.setdefault(organization_id, set())
        held.add(subscription)
        self._watched = frozenset(self._subscriptions)
        try:
            yield subscription
        finally:
            held.discard(subscription)
            if not held and self._subscriptions.get(organization_id) is held:
                del self._subscriptions[organization_id]
            self._watched = frozenset(self._subscriptions)


async def customer_refs(
    store: Store, organization_id: str, customer_ids: Collection[str], external_ids: Collection[str]
) -> frozenset[str] | None:
    """The customer references a stream narrowed to these customers follows (None: not
    narrowed): both ids of each customer found, and the external ids given, which a customer
    may take later."""
    if not customer_ids and not external_ids:
        return None
    found = await store.read_now(
        customers_by_refs, organization_id, list(customer_ids), list(external_ids)
    )
    refs = {subjects.of_id(c) for c in customer_ids}
    refs |= {subjects.of_external(e) for e in external_ids}
    for customer in found:
        refs.update(subjects.of_customer(customer))
    return frozenset(refs)


async def changed_balances(
    store: Store, organization_id: str, pairs: Collection[Pair]
) -> list[CustomerMeter]:
    """The customer meters of changed (meter id, customer reference) pairs, as they are now:
    references no customer has and archived meters left out. Balances, customers and meters
    come from memory (the store's catalog), so a push costs one statement (active holds) and
    never waits for applied events to be stored."""
    live = store.live

    def run(con: duckdb.DuckDBPyConnection) -> list[CustomerMeter]:
        catalog = live.catalog
        named = catalog.customers_of_subjects(con, organization_id, sorted({r for _, r in pairs}))
        meters = {m: catalog.meter(con, organization_id, m) for m in {m for m, _ in pairs}}
        wanted = {}
        for meter_id, ref in pairs:
            customer, meter = named.get(ref), meters[meter_id]
            if customer is not None and meter is not None and meter.archived_at_us is None:
                wanted[(customer.id, meter_id)] = (customer, meter)
        holds = held_by_pair(con, sorted(wanted), now_us())
        return [
            replace(held_customer_meter(live.balances, c, m), held=holds.get(key, 0.0))
            for key, (c, m) in sorted(wanted.items())
        ]

    return await store.read_now(run)
