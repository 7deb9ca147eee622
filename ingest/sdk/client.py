"""`Ingestion`: the blocking client. `ingest()` only encodes the event and queues it; sender
threads (`max_in_flight` of them) cut batches and deliver them. Nothing the caller does waits
for the network, except `flush()`, `close()` and, with on_full="block", a full queue."""

from __future__ import annotations

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
from ingest.sdk.transports import HTTPTransport, Token, Transport

__all__ = ["Ingestion"]
log = logging.getLogger("ingest.sdk")
_CLOSED = "the client closed (close() or the exit flush timed out) before these were delivered"


class Ingestion(ClientBase):
    """Batching usage-event client; a drop-in for polar-sdk's `Ingestion` helper.

        ingestion = Ingestion(token, base_url="http://127.0.0.1:8000")
        ingestion.ingest({"name": "api_call", "external_customer_id": "cust_1"})

    Without `transport`, events go over HTTP to `base_url` (polar-sdk's `server_url` and
    `server` work too; the default is Polar's production API). `base_url` may be a list of
    URLs of one meterline (its edges): each request goes to the first that answers
    (`ingest.sdk.failover`), each attempt within `timeout` seconds and the whole request within
    `deadline` (default: `timeout` per URL). See `Options` for the rest.
    """

    def __init__(
        self,
        access_token: Token = None,
        server: str | None = None,
        server_url: str | Sequence[str] | None = None,
        *,
        base_url: str | Sequence[str] | None = None,
        transport: Transport | None = None,
        timeout: float = 10.0,
        deadline: float | None = None,
        **options: Unpack[Options],
    ) -> None:
        super().__init__(**options)
        self._transport: Transport = transport or HTTPTransport(
            base_url_of(base_url, server_url, server),
            access_token,
            timeout=timeout,
            deadline=deadline,
        )
        self._ready = threading.Condition(self._lock)  # senders: a batch may be ready
        self._space = threading.Condition(self._lock)  # blocked ingest(): room in the queue
        self._settled = threading.Condition(self._lock)  # flush() and close()
        self._stop = threading.Event()  # close() timed out: senders give up
        self._hurry = 0  # flush() calls in progress: batches go without lingering
        self._paused_until = 0.0  # Retry-After: no sender sends before this (monotonic)
        self._finished = False
        self._threads = [
            threading.Thread(target=self._run, name=f"meterline-sdk-{i}", daemon=True)
            for i in range(self._max_in_flight)
        ]
        for thread in self._threads:
            thread.start()
        self._exit_hook = options.get("flush_at_exit", True)
        if self._exit_hook:
            atexit.register(self._at_exit)

    def ingest(self, event: Mapping[str, Any]) -> str:
        """Record one event (a dict as `POST /v1/events/ingest` takes it) and return its
        external_id (assigned here unless the event has one; its timestamp defaults to now).

        Raises:
            InvalidEvent: not an event that can be sent (no name, both or no customer ids,
                not JSON, larger than max_batch_bytes).
            QueueFull: the queue is full (at once with on_full="raise"; after block_timeout
                with "block").
            ClientClosed: after close().
        """
        external_id, data = self._recorder.encode(event)
        with self._lock:
            if self._closed:
                raise ClientClosed("ingest() after close()")
            if self._buffer.full:
                self._wait_for_room()
            if self._buffer.put(data, time.monotonic()):
                self._ready.notify()
        return external_id

    def requeue(self, events: list[bytes]) -> None:
        """Queue events already encoded (with their external_ids), past max_queue_size: what
        an AsyncIngestion left when its loop ended, delivered at interpreter exit."""
        with self._lock:
            now = time.monotonic()
            for data in events:
                self._buffer.put(data, now)
            self._ready.notify_all()

    def check_balance(
        self,
        meter_id: str,
        units: int = 1,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
    ) -> dict[str, Any]:
        """May the customer spend `units` of the meter? meterline's
        `GET /v1/customer-meters/check`: {"allowed", "units", "balance", "balance_after", ...}.

        Raises:
            RequestFailed: refused (404: no such customer or meter), or no URL answered.
            ValueError: not exactly one of customer_id, external_customer_id.
        """
        return self._call(api.balance_check(meter_id, units, customer_id, external_customer_id))

    def customer_meters(
        self,
        *,
        meter_id: str | None = None,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        page: int = 1,
        limit: int = 10,
    ) -> dict[str, Any]:
        """A page of customer meters (`GET /v1/customer-meters/`: {"items", "pagination"}),
        with their balances. Raises RequestFailed."""
        return self._call(
            api.customer_meters(meter_id, customer_id, external_customer_id, page, limit)
        )

    def credit(
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
        """Grant (or, with negative units, revoke) credits: `POST /v1/meter-credits/`,
        {"customer_meter", "replayed"}. `external_id` is the credit's idempotency key (one is
        drawn when not given): sent again to another URL, or later with the same key, the
        credit is applied once.

        Raises:
            RequestFailed: refused (409: the key was used for another credit; 422), or no URL
                answered (the credit may have been applied: call again with its external_id).
        """
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
        return self._call(call)

    def _call(self, call: api.ApiCall) -> dict[str, Any]:
        transport = self._transport
        if not isinstance(transport, HTTPTransport):
            raise SDKError(f"{call.method} {call.path} needs a client over HTTP (base_url)")
        if self._finished:
            raise ClientClosed(f"{call.method} {call.path} after close()")
        try:
            response = transport.request(
                call.method, call.path, params=call.params, body=call.body, headers=call.headers
            )
        except TransportError as exc:
            raise api.unanswered(call, str(exc)) from None
        return api.answer_of(call, response)

    def _wait_for_room(self) -> None:
        if self._on_full == "raise" or not self._space.wait_for(
            lambda: self._closed or not self._buffer.full, self._block_timeout
        ):
            raise self._full()
        if self._closed:
            raise ClientClosed("ingest() after close()")

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_SECONDS) -> bool:
        """Send what is queued now, without waiting for batches to fill, and wait until every
        event recorded before this call is settled: delivered, or reported to on_error.
        False if `timeout` (seconds; None: no bound) ran out first: the events stay queued and
        are still sent. Do not call it from on_error."""
        with self._lock:
            target = self._buffer.recorded
            self._hurry += 1
            self._ready.notify_all()
            try:
                return self._settled.wait_for(
                    lambda: self._buffer.settled_below() >= target, timeout
                )
            finally:
                self._hurry -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking events, deliver what is left, stop the senders. Whatever is not
        delivered within `timeout` seconds is reported to on_error as Undelivered (safe to send
        again later: the events keep their external_ids). Idempotent."""
        with self._lock:
            if self._finished:
                return
            self._finished = self._closed = True
            self._ready.notify_all()
            self._space.notify_all()
            target = self._buffer.recorded
            done = self._settled.wait_for(lambda: self._buffer.settled_below() >= target, timeout)
            left = [] if done else self._buffer.drain()
            if not done:
                self._stop.set()
                self._ready.notify_all()
        if left:
            self.report(Undelivered(_CLOSED, decode(left)))
        for thread in self._threads:
            # A sender still waiting for an answer gets a moment, then its client is closed.
            thread.join(0 if done else 1.0)
        self._transport.close()
        for thread in self._threads:
            thread.join(1.0)
        if self._exit_hook:
            atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.close(self._exit_timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
            if batch is None:
                return
            self._deliver(batch)
            with self._lock:
                self._buffer.settle(batch)
                self._settled.notify_all()

    def _next_batch(self) -> Batch | None:
        """Wait (lock held) until a batch should go; None when the senders should stop."""
        while not self._stop.is_set():
            now = time.monotonic()
            hurry = self._hurry > 0 or self._closed
            wait = self._buffer.wait_time(now, hurry)
            if wait is None:
                if self._closed:
                    return None
                self._ready.wait()
                continue
            if wait == 0 and now >= self._paused_until:
                batch = self._buffer.take()
                self._space.notify_all()
                if self._buffer.wait_time(now, hurry) == 0:
                    self._ready.notify()  # more is ready: another sender can take it
                return batch
            self._ready.wait(max(wait, self._paused_until - now))
        return None

    def _deliver(self, batch: Batch) -> None:
        delivery = Delivery(batch.events, self._policy)
        while not delivery.done:
            pause = self._paused_until - time.monotonic()
            if self._stop.wait(pause) if pause > 0 else self._stop.is_set():
                break
            try:
                step = delivery.answered(self._transport.send(delivery.current))
            except TransportError as exc:
                step = delivery.failed(str(exc))
            except Exception as exc:  # a broken transport must not kill the sender (and its events)
                log.exception("transport raised")
                step = delivery.failed(f"{type(exc).__name__}: {exc}")
            self._account(step)
            if step.pause_all:
                with self._lock:
                    self._paused_until = max(self._paused_until, time.monotonic() + step.wait)
            elif step.wait and self._stop.wait(step.wait):
                break
        report = delivery.abandon(_CLOSED)
        if report is not None:
            self.report(report)
