"""`AsyncIngestion`: the same client on an asyncio event loop. `ingest()` is a plain call that
only queues (it never awaits, so strategies can call it anywhere); sender tasks on the loop
deliver. Use it as `async with AsyncIngestion(...)`, or call `await aclose()` on shutdown."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, Unpack

from ingest.sdk import api
from ingest.sdk.batching import Batch
from ingest.sdk.core import FLUSH_TIMEOUT_SECONDS, ClientBase, Options, base_url_of
from ingest.sdk.delivery import Delivery, decode
from ingest.sdk.errors import ClientClosed, SDKError, TransportError, Undelivered
from ingest.sdk.transports import AsyncHTTPTransport, AsyncTransport, Token

__all__ = ["AsyncIngestion"]
log = logging.getLogger("ingest.sdk")
_CLOSED = "the client closed (aclose() timed out, or the loop ended) before these were delivered"


class AsyncIngestion(ClientBase):
    """The async variant of `Ingestion`: the same arguments, with an `AsyncTransport`.

    `ingest()` may be called from the loop's thread (or, thread-safely, from others once the
    client runs). With on_full="block", `ingest()` cannot wait without blocking the loop, so it
    raises QueueFull; `await aingest(event)` waits for room up to block_timeout instead.
    """

    def __init__(
        self,
        access_token: Token = None,
        server: str | None = None,
        server_url: str | Sequence[str] | None = None,
        *,
        base_url: str | Sequence[str] | None = None,
        transport: AsyncTransport | None = None,
        timeout: float = 10.0,
        deadline: float | None = None,
        **options: Unpack[Options],
    ) -> None:
        super().__init__(**options)
        self._options = options  # for the exit flush's blocking client
        self._transport: AsyncTransport = transport or AsyncHTTPTransport(
            base_url_of(base_url, server_url, server),
            access_token,
            timeout=timeout,
            deadline=deadline,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()  # senders: a batch may be ready
        self._progress = asyncio.Event()  # flush(), aclose(), aingest(): something settled
        self._open: dict[int, tuple[Batch, Delivery]] = {}  # batches being delivered
        self._hurry = 0
        self._paused_until = 0.0
        self._finished = False
        self._exit_hook = options.get("flush_at_exit", True)
        if self._exit_hook:
            atexit.register(self._at_exit)

    def ingest(self, event: Mapping[str, Any]) -> str:
        """Record one event and return its external_id; see `Ingestion.ingest`. Never waits."""
        external_id, data = self._recorder.encode(event)
        if self._loop is None:
            self._start()
        with self._lock:
            if self._closed:
                raise ClientClosed("ingest() after aclose()")
            if self._buffer.full:
                raise self._full()
            wake = self._buffer.put(data, time.monotonic())
        if wake:
            self._wake()
        return external_id

    async def aingest(self, event: Mapping[str, Any]) -> str:
        """`ingest()`, but with on_full="block" it waits (up to block_timeout) for room."""
        if self._on_full == "block" and self._buffer.full:
            try:
                async with asyncio.timeout(self._block_timeout):
                    while self._buffer.full and not self._closed:
                        self._progress.clear()
                        await self._progress.wait()
            except TimeoutError:
                raise self._full() from None
        return self.ingest(event)

    async def check_balance(
        self,
        meter_id: str,
        units: int = 1,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
    ) -> dict[str, Any]:
        """`Ingestion.check_balance`, on the event loop."""
        return await self._call(
            api.balance_check(meter_id, units, customer_id, external_customer_id)
        )

    async def customer_meters(
        self,
        *,
        meter_id: str | None = None,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        page: int = 1,
        limit: int = 10,
    ) -> dict[str, Any]:
        """`Ingestion.customer_meters`, on the event loop."""
        return await self._call(
            api.customer_meters(meter_id, customer_id, external_customer_id, page, limit)
        )

    async def credit(
        self,
        meter_id: str,
        units: int,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        external_id: str | None = None,
        rollover: bool = False,
        priority: int | None = None,
        expires_at: datetime | str | None = None,
    ) -> dict[str, Any]:
        """`Ingestion.credit`, on the event loop."""
        call = api.credit(
            meter_id,
            units,
            customer_id,
            external_customer_id,
            external_id=external_id,
            rollover=rollover,
            priority=priority,
            expires_at=expires_at,
        )
        return await self._call(call)

    async def _call(self, call: api.ApiCall) -> dict[str, Any]:
        transport = self._transport
        if not isinstance(transport, AsyncHTTPTransport):
            raise SDKError(f"{call.method} {call.path} needs a client over HTTP (base_url)")
        if self._finished:
            raise ClientClosed(f"{call.method} {call.path} after aclose()")
        try:
            response = await transport.request(
                call.method, call.path, params=call.params, body=call.body, headers=call.headers
            )
        except TransportError as exc:
            raise api.unanswered(call, str(exc)) from None
        return api.answer_of(call, response)

    # A timeout parameter rather than asyncio.timeout(): the sync client's signature, and
    # aclose() must not be cancelled halfway (it reports what it could not deliver).
    async def flush(self, timeout: float | None = FLUSH_TIMEOUT_SECONDS) -> bool:  # noqa: ASYNC109
        """Send what is queued without lingering and wait until every event recorded before
        the call is delivered or reported to on_error; False if `timeout` (None: no bound) ran
        out first, the events still queued and sent."""
        target = self._buffer.recorded
        self._hurry += 1
        self._wake()
        try:
            return await self._settled(target, timeout)
        finally:
            self._hurry -= 1

    async def aclose(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop taking events, deliver what is left within `timeout`, report the rest to
        on_error as Undelivered, close the transport. Idempotent."""
        if self._finished:
            return
        self._finished = self._closed = True
        self._wake()
        self._progress.set()  # wakes aingest() callers, which then see the client closed
        done = await self._settled(self._buffer.recorded, timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not done:
            self._abandon()
        await self._transport.aclose()
        if self._exit_hook:
            atexit.unregister(self._at_exit)

    async def __aenter__(self) -> Self:
        if self._loop is None:
            self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise SDKError(
                "AsyncIngestion starts on an event loop: first use it from a coroutine"
                " (or use Ingestion outside asyncio)"
            ) from None
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._tasks = [
            loop.create_task(self._run(), name=f"meterline-sdk-{i}")
            for i in range(self._max_in_flight)
        ]

    def _wake(self) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._wakeup.set()
        else:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def _settled(self, target: int, timeout: float | None) -> bool:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                while self._buffer.settled_below() < target:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        while (batch := await self._next_batch()) is not None:
            delivery = Delivery(batch.events, self._policy)
            # Until settled, the batch stays here: if the task is cancelled (aclose timed out,
            # asyncio.run ended), what is left is reported or sent by the exit flush.
            self._open[batch.start] = (batch, delivery)
            await self._deliver(delivery)
            del self._open[batch.start]
            with self._lock:
                self._buffer.settle(batch)
            self._progress.set()

    async def _next_batch(self) -> Batch | None:
        while True:
            with self._lock:
                now = time.monotonic()
                hurry = self._hurry > 0 or self._closed
                wait = self._buffer.wait_time(now, hurry)
                if wait is None and self._closed:
                    return None
                if wait == 0 and now >= self._paused_until:
                    batch = self._buffer.take()
                    more = self._buffer.wait_time(now, hurry) == 0
                    break
                self._wakeup.clear()
            timeout = None if wait is None else max(wait, self._paused_until - now)
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
        self._progress.set()  # room in the queue for aingest()
        if more:
            self._wakeup.set()
        return batch

    async def _deliver(self, delivery: Delivery) -> None:
        while not delivery.done:
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                step = delivery.answered(await self._transport.send(delivery.current))
            except TransportError as exc:
                step = delivery.failed(str(exc))
            except Exception as exc:  # a broken transport must not kill the sender
                log.exception("transport raised")
                step = delivery.failed(f"{type(exc).__name__}: {exc}")
            self._account(step)
            if step.pause_all:
                self._paused_until = max(self._paused_until, time.monotonic() + step.wait)
            elif step.wait:
                await asyncio.sleep(step.wait)

    def _abandon(self) -> None:
        """Report everything not delivered: the queue and the batches senders left."""
        left = self._leftovers()
        if left:
            self.report(Undelivered(_CLOSED, decode(left)))

    def _leftovers(self) -> list[bytes]:
        events: list[bytes] = []
        for batch, delivery in list(self._open.values()):
            events += delivery.rest()
            with self._lock:
                self._buffer.settle(batch)
        self._open.clear()
        with self._lock:
            events += self._buffer.drain()
        return events

    def _at_exit(self) -> None:
        """The loop is gone but events are left (no aclose()): deliver them with a blocking
        transport to the same place, within exit_timeout."""
        if self._finished or (self._loop is not None and self._loop.is_running()):
            return
        self._finished = self._closed = True
        left = self._leftovers()
        if not left:
            return
        from ingest.sdk.client import Ingestion

        options: Options = {**self._options, "flush_at_exit": False, "on_error": self.report}
        rescue = Ingestion(transport=self._transport.blocking(), **options)
        rescue.requeue(left)
        rescue.close(self._exit_timeout)
