"""What the sync and the async client share: options, recording into the bounded queue,
statistics, and reporting what cannot be delivered."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from ingest.sdk.batching import BODY_OVERHEAD, Buffer
from ingest.sdk.delivery import RetryPolicy, Step
from ingest.sdk.errors import DeliveryError, EventsRejected, QueueFull
from ingest.sdk.failover import Servers
from ingest.sdk.recording import Recorder
from ingest.sdk.transports import POLAR_SERVERS, Token, http_endpoint

if TYPE_CHECKING:
    from ingest.sdk.strategies.base import BaseStrategy

log = logging.getLogger("ingest.sdk")
S = TypeVar("S", bound="BaseStrategy")
ErrorCallback = Callable[[DeliveryError], None]
# flush()'s default bound: a broker or server down for longer never hangs its caller; what is
# not delivered by then stays queued.
FLUSH_TIMEOUT_SECONDS = 30.0


class Options(TypedDict, total=False):
    """Keyword options of both clients (the first three keep polar-sdk's names)."""

    max_batch_size: int  # events per request (default 2,000)
    flush_interval: float  # the longest an event waits for its batch to fill, s (default 0.5)
    max_queue_size: int  # events recorded and not yet sent (default 100,000)
    max_batch_bytes: int  # request body limit (default 4 MiB; Polar and meterline take 10)
    on_full: Literal["block", "raise"]  # when the queue is full (default "raise")
    block_timeout: float  # with "block": how long to wait for room, s (default 5)
    max_in_flight: int  # requests at once (default 8)
    max_attempts: int | None  # sends of one batch; None: until delivered or closed
    backoff_base: float  # the first retry's wait without Retry-After, then doubling (0.1 s)
    backoff_max: float  # the longest such wait (30 s)
    on_error: ErrorCallback | None  # events given up on (default: logged)
    flush_at_exit: bool  # deliver what is left when the interpreter exits (default True)
    exit_timeout: float  # how long that may take, s (default 10)


@dataclass(frozen=True, slots=True)
class Stats:
    recorded: int  # events accepted by ingest()
    queued: int  # recorded, not yet taken by a sender
    delivered: int  # acknowledged by the server (2xx)
    rejected: int  # refused by the server (422), reported to on_error
    failed: int  # given up on otherwise, reported to on_error
    retries: int  # sends repeated after no answer, 408, 425, 429 or 5xx


def base_url_of(
    base_url: str | Sequence[str] | None, server_url: str | Sequence[str] | None, server: str | None
) -> str | Sequence[str]:
    """Our `base_url` (one URL, or several of one meterline: `ingest.sdk.failover`), or
    polar-sdk's `server_url` and `server` ("production", "sandbox")."""
    for given in (base_url, server_url):
        if given is not None and given != "":
            return given
    try:
        return POLAR_SERVERS[server or "production"]
    except KeyError:
        raise ValueError(f"unknown server {server!r}; use base_url") from None


def _log_error(error: DeliveryError) -> None:
    log.error("%s: %d event(s) not delivered: %s", type(error).__name__, len(error.events), error)


class ClientBase(ABC):
    def __init__(
        self,
        *,
        max_batch_size: int = 2000,
        flush_interval: float = 0.5,
        max_queue_size: int = 100_000,
        max_batch_bytes: int = 4 * 1024 * 1024,
        on_full: Literal["block", "raise"] = "raise",
        block_timeout: float = 5.0,
        max_in_flight: int = 8,
        max_attempts: int | None = None,
        backoff_base: float = 0.1,
        backoff_max: float = 30.0,
        on_error: ErrorCallback | None = None,
        flush_at_exit: bool = True,
        exit_timeout: float = 10.0,
    ) -> None:
        if min(max_batch_size, max_queue_size, max_in_flight) < 1:
            raise ValueError("max_batch_size, max_queue_size and max_in_flight must be ≥ 1")
        if max_batch_bytes <= BODY_OVERHEAD + 2 or flush_interval < 0:
            raise ValueError("max_batch_bytes too small, or flush_interval negative")
        if on_full not in ("block", "raise"):
            raise ValueError('on_full is "block" or "raise"')
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be ≥ 1 (or None)")
        self._recorder = Recorder(max_batch_bytes - BODY_OVERHEAD)
        self._buffer = Buffer(
            max_events=max_queue_size,
            batch_events=max_batch_size,
            batch_bytes=max_batch_bytes,
            linger=flush_interval,
        )
        self._policy = RetryPolicy(max_attempts, backoff_base, backoff_max)
        self._on_full = on_full
        self._block_timeout = block_timeout
        self._max_in_flight = max_in_flight
        self._on_error = on_error or _log_error
        self._exit_timeout = exit_timeout
        # Guards the buffer and the counters; held only briefly, never across I/O.
        self._lock = threading.Lock()
        self._closed = False
        self._delivered = self._rejected = self._failed = self._retries = 0

    def strategy(self, strategy_class: type[S], event_name: str, **metadata: Any) -> S:
        """A strategy bound to this client (polar-sdk's signature): its events are named
        `event_name` and carry `metadata` besides their own."""
        return strategy_class(event_name, self, metadata=metadata)

    @abstractmethod
    def ingest(self, event: Mapping[str, Any]) -> str:
        """Record one event; its external_id."""

    def stats(self) -> Stats:
        with self._lock:
            return Stats(
                recorded=self._buffer.recorded,
                queued=len(self._buffer),
                delivered=self._delivered,
                rejected=self._rejected,
                failed=self._failed,
                retries=self._retries,
            )

    @property
    def http_endpoint(self) -> tuple[Servers, Token] | None:
        """The URLs (`Servers`) and token of the meterline this client sends to over HTTP
        (None when it sends another way, as to Kafka)."""
        return http_endpoint(getattr(self, "_transport", None))

    @property
    def id_prefix(self) -> str:
        """The start of every external_id this client assigns."""
        return self._recorder.prefix

    def report(self, error: DeliveryError) -> None:
        """Count `error`'s events and hand it to on_error (whose exceptions are logged)."""
        with self._lock:
            if isinstance(error, EventsRejected):
                self._rejected += len(error.events)
            else:
                self._failed += len(error.events)
        try:
            self._on_error(error)
        except Exception:  # a failing callback must not stop delivery
            log.exception("on_error raised")

    def _account(self, step: Step) -> None:
        if step.delivered or step.retried:
            with self._lock:
                self._delivered += step.delivered
                self._retries += step.retried
        for error in step.reports:
            self.report(error)

    def _full(self) -> QueueFull:
        return QueueFull(f"the queue holds {len(self._buffer)} events (max_queue_size)")
