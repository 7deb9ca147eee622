"""What every strategy shares: its event name and metadata, the customer of each call, the
cost hook, recording that never fails the call being measured, and pass-through wrappers of
streams (iterators, async iterators) whose items a strategy observes."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from ingest.sdk.api import customer_fields
from ingest.sdk.cost import CostValue, cost_metadata
from ingest.sdk.errors import DeliveryError, NotRecorded
from ingest.sdk.failover import Servers
from ingest.sdk.transports import Token

CostFunction = Callable[[dict[str, Any]], CostValue]


class Ingestion(Protocol):
    """What a strategy asks of the client that made it (`core.ClientBase`)."""

    def ingest(self, event: Mapping[str, Any]) -> str: ...
    def report(self, error: DeliveryError) -> None: ...
    @property
    def http_endpoint(self) -> tuple[Servers, Token] | None: ...


class BaseStrategy:
    """A way of measuring usage that records one event per use (polar-sdk's signature:
    `BaseStrategy(event_name, ingestion, metadata)`; usually made by `ingestion.strategy()`).

    Metadata of an event, later keys winning: what the strategy measured, the strategy's
    metadata, the call's metadata, then `_cost` when a cost function is set.
    """

    def __init__(
        self,
        event_name: str,
        ingestion: Ingestion,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.event_name = event_name
        self._ingestion = ingestion
        self._metadata = dict(metadata or {})
        self._cost: CostFunction | None = None

    def cost(self, fn: CostFunction) -> Self:
        """Price every event: `fn(metadata)` gets the event's metadata and returns its cost in
        cents (a number, Decimal or numeric string, or {"amount", "currency": "usd"}); it is
        sent as `_cost`, rounded to 12 decimal places. Returns the strategy (chainable)."""
        self._cost = fn
        return self

    def use(
        self, customer_id: str | None, external_customer_id: str | None, metadata: dict[str, Any]
    ) -> Use:
        """The customer and call metadata of the events of one wrapper or measurement."""
        return Use(self, customer_fields(customer_id, external_customer_id), metadata)

    def record(
        self,
        customer: Mapping[str, str],
        measured: Mapping[str, Any],
        metadata: Mapping[str, Any],
        external_id: str | None = None,
    ) -> str | None:
        """Record one event; its external_id, or None when it could not be recorded (queue
        full, client closed, a cost function that raised or returned an invalid amount: the
        event then goes to on_error as NotRecorded). Never raises: metering must not fail the
        call it measures."""
        event_metadata = {**measured, **self._metadata, **metadata}
        event: dict[str, Any] = {"name": self.event_name, **customer, "metadata": event_metadata}
        if external_id is not None:  # a hold's, which this event settles
            event["external_id"] = external_id
        try:
            if self._cost is not None:
                event_metadata["_cost"] = cost_metadata(self._cost(event_metadata))
            return self._ingestion.ingest(event)
        except Exception as exc:  # noqa: BLE001 (reported with the event, to be sent later)
            self._ingestion.report(NotRecorded(f"{type(exc).__name__}: {exc}", [event]))
            return None


@dataclass(frozen=True, slots=True)
class Use:
    strategy: BaseStrategy
    customer: dict[str, str]
    metadata: dict[str, Any]

    def record(self, measured: Mapping[str, Any], external_id: str | None = None) -> str | None:
        return self.strategy.record(self.customer, measured, self.metadata, external_id)


class Observer(Protocol):
    def observe(self, item: Any) -> bool:
        """Take note of an item; False hides it from the caller."""
        ...

    def finish(self) -> None:
        """The stream ended, failed or was closed (called once; later calls do nothing)."""
        ...


class Observed:
    """A stream (any iterator) passed through item by item, each item shown to `observer`."""

    def __init__(self, stream: Any, observer: Observer) -> None:
        self._stream = stream
        # A write-only file is no iterator: it has no items to pass through.
        self._items: Iterator[Any] = iter(stream) if hasattr(stream, "__iter__") else iter(())
        self._observer = observer

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self._items)
            except BaseException:  # the end, or a broken stream: what was seen counts
                self._observer.finish()
                raise
            if self._observer.observe(item):
                return item

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._observer.finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class AsyncObserved:
    """`Observed` for async iterators (async streams, async generators)."""

    def __init__(self, stream: Any, observer: Observer) -> None:
        self._stream = stream
        self._items: AsyncIterator[Any] = stream.__aiter__()
        self._observer = observer

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                item = await self._items.__anext__()
            except BaseException:
                self._observer.finish()
                raise
            if self._observer.observe(item):
                return item

    async def close(self) -> None:
        """The stream's `close()` (async streams) or `aclose()` (async generators)."""
        try:
            close = getattr(self._stream, "close", None) or getattr(self._stream, "aclose", None)
            if close is not None:
                done = close()
                if inspect.isawaitable(done):
                    await done
        finally:
            self._observer.finish()

    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
