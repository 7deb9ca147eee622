"""Who may use ingest capacity, and how much: so that one tenant's flood, slow uploads or big
bodies never stop another tenant's ingest.

A request passes, in order (each check but the events' also made from its headers alone, before
its body is read: `refusal`, which the HTTP protocol asks, so that a flood's refused requests
cost their headers only):
1. the rate limits of its token and of its organization: requests per second, and events per
   second (charged once the body is validated, so a request may overdraw; the next ones wait
   until the bucket refills) → 429 + Retry-After;
2. a share of the buffered-body budget while its body arrives, within the read deadline → 503
   when the whole budget is taken, 429 when its organization's share is, 408 past the deadline;
3. an in-flight slot (validating and publishing), taken only once the body is read; an
   organization holds at most its share of the slots → 429, and 503 when all are taken.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from ingest.errors import BodyTimeout, TooManyRequests, Unavailable
from ingest.http.requests import read_body
from ingest.settings import MIB, Limits


class _Bucket:
    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._level = rate
        self._at = time.monotonic()

    def _refill(self, now: float) -> None:
        # `now` may precede the bucket's start: read before a new token's bucket was made.
        elapsed = max(0.0, now - self._at)
        self._level = min(self._rate, self._level + elapsed * self._rate)
        self._at = max(self._at, now)

    def wait(self, now: float, amount: float) -> float:
        """Seconds until `amount` may be taken: 0 means taken now."""
        self._refill(now)
        if self._level >= amount or self._level >= self._rate:
            self._level -= amount
            return 0.0
        return (amount - self._level) / self._rate

    def peek(self, now: float, amount: float) -> float:
        """`wait` without taking."""
        self._refill(now)
        if self._level >= amount or self._level >= self._rate:
            return 0.0
        return (amount - self._level) / self._rate

    def overdrawn(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 if it is not in debt)."""
        self._refill(now)
        return max(0.0, -self._level / self._rate)

    def charge(self, amount: float) -> None:
        self._level -= amount


class Admission:
    """The limits of one ingest endpoint, and what each token and organization holds of them.
    Counters are exposed for `/metrics`."""

    # Why a request is refused: each a series of `/metrics` from the start (at 0).
    REASONS = (
        "token_rate",
        "organization_rate",
        "organization_inflight",
        "inflight",
        "organization_bytes",
        "buffered_bytes",
        "body_timeout",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        share = limits.organization_share
        self._org_slots = max(1, int(limits.max_inflight * share))
        self._org_bytes = max(1, int(limits.max_buffered_bytes * share))
        self._requests: dict[tuple[str, str], _Bucket] = {}
        self._events: dict[tuple[str, str], _Bucket] = {}
        self._inflight: Counter[str] = Counter()
        self._buffered: Counter[str] = Counter()
        self.inflight = 0
        self.buffered_bytes = 0
        # (reason, organization id) -> requests refused for it.
        self.refused: Counter[tuple[str, str]] = Counter()
        # Events accepted (charged), all organizations together: a series per organization
        # would grow with the tenants.
        self.accepted_events = 0
        self._trim = _Trimmer()

    def _buckets(self, token: str, organization: str) -> list[tuple[str, _Bucket, _Bucket]]:
        found = []
        for kind, key, rate in (
            ("token", token, self.limits.token_rate),
            ("organization", organization, self.limits.organization_rate),
        ):
            if (kind, key) not in self._requests:
                self._requests[kind, key] = _Bucket(rate.requests)
                self._events[kind, key] = _Bucket(rate.events)
            found.append((kind, self._requests[kind, key], self._events[kind, key]))
        return found

    def _refuse(self, reason: str, organization: str) -> None:
        self.refused[reason, organization] += 1

    def check_rate(self, token: str, organization: str) -> None:
        """Take one request from the token's and the organization's buckets (429 when either
        is empty, or either's events are overdrawn)."""
        now = time.monotonic()
        for kind, requests, events in self._buckets(token, organization):
            wait = events.overdrawn(now) or requests.wait(now, 1)
            if wait:
                self._refuse(f"{kind}_rate", organization)
                raise TooManyRequests(
                    f"The {kind}'s ingest rate limit was exceeded; retry after the delay given.",
                    math.ceil(wait),
                )

    def refusal(
        self, token: str, organization: str, content_length: int | None
    ) -> TooManyRequests | Unavailable | None:
        """What a request of `token` would be refused for now, judged from its headers before
        its body is read, taking nothing (the request, if let in, takes its share as usual):
        the rate limits, its organization's share of in-flight requests and of buffered bytes
        (its declared length), and the whole in-flight budget."""
        now = time.monotonic()
        for kind, requests, events in self._buckets(token, organization):
            wait = events.overdrawn(now) or requests.peek(now, 1)
            if wait:
                self._refuse(f"{kind}_rate", organization)
                return TooManyRequests(
                    f"The {kind}'s ingest rate limit was exceeded; retry after the delay given.",
                    math.ceil(wait),
                )
        if self._inflight[organization] >= self._org_slots:
            self._refuse("organization_inflight", organization)
            return TooManyRequests(
                "The organization has too many ingest requests in flight; retry shortly.", 1
            )
        if content_length and self._buffered[organization] + content_length > self._org_bytes:
            self._refuse("organization_bytes", organization)
            return TooManyRequests(
                "The organization's share of the buffered ingest bodies is taken; retry shortly.",
                1,
            )
        if self.inflight >= self.limits.max_inflight:
            self._refuse("inflight", organization)
            return Unavailable("Too many ingest requests in flight; retry shortly.", 1)
        return None

    def charge_events(self, token: str, organization: str, count: int) -> None:
        """Charge a request's accepted events to the token's and organization's budgets."""
        self.accepted_events += count
        for _, _, events in self._buckets(token, organization):
            events.charge(count)

    async def read_body(self, request: Request, organization: str, max_bytes: int) -> _Body:
        """The body (413 past `max_bytes`, 408 past the deadline), counted against the byte
        budgets until the returned `_Body` is released."""
        body = _Body(self, organization)
        try:
            body.data = await read_body(
                request, max_bytes, self.limits.body_timeout_seconds, body.grow_to
            )
        except BaseException as exc:
            body.release()
            if isinstance(exc, BodyTimeout):
                self._refuse("body_timeout", organization)
            raise
        return body

    def reserve(self, organization: str, size: int) -> None:
        if self._buffered[organization] + size > self._org_bytes:
            self._refuse("organization_bytes", organization)
            raise TooManyRequests(
                "The organization's share of the buffered ingest bodies is taken; retry shortly.",
                1,
            )
        if self.buffered_bytes + size > self.limits.max_buffered_bytes:
            self._refuse("buffered_bytes", organization)
            raise Unavailable("Too many ingest bodies are buffered; retry shortly.", 1)
        self._buffered[organization] += size
        self.buffered_bytes += size

    def unreserve(self, organization: str, size: int) -> None:
        self._buffered[organization] -= size
        if not self._buffered[organization]:
            del self._buffered[organization]
        self.buffered_bytes -= size
        self._trim.released(size)

    @asynccontextmanager
    async def slot(self, organization: str) -> AsyncIterator[None]:
        """An in-flight slot for the organization for the duration of the block."""
        if self._inflight[organization] >= self._org_slots:
            self._refuse("organization_inflight", organization)
            raise TooManyRequests(
                "The organization has too many ingest requests in flight; retry shortly.", 1
            )
        if self.inflight >= self.limits.max_inflight:
            self._refuse("inflight", organization)
            raise Unavailable("Too many ingest requests in flight; retry shortly.", 1)
        self._inflight[organization] += 1
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._inflight[organization] -= 1
            if not self._inflight[organization]:
                del self._inflight[organization]


class _Body:
    """A request body and the bytes it holds of the budgets."""

    def __init__(self, admission: Admission, organization: str) -> None:
        self._admission = admission
        self._organization = organization
        self.reserved = 0
        self.data = b""

    def grow_to(self, size: int) -> None:
        if size > self.reserved:
            self._admission.reserve(self._organization, size - self.reserved)
            self.reserved = size

    def release(self) -> None:
        if self.reserved:
            self._admission.unreserve(self._organization, self.reserved)
            self.reserved = 0
        self.data = b""


class _Trimmer:
    """Hands freed heap back to the OS after big bodies: glibc keeps freed memory in its
    arenas otherwise, and one burst of large bodies would hold its peak RSS for good. At most
    once a second, a second after enough was freed, so that a burst ends with a trim."""

    THRESHOLD = 64 * MIB

    def __init__(self) -> None:
        self._freed = 0
        self._scheduled = False
        path = ctypes.util.find_library("c")
        self._malloc_trim = getattr(ctypes.CDLL(path), "malloc_trim", None) if path else None

    def released(self, size: int) -> None:
        self._freed += size
        if self._malloc_trim is None or self._scheduled or self._freed < self.THRESHOLD:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_later(1.0, self._run)

    def _run(self) -> None:
        self._scheduled = False
        self._freed = 0
        assert self._malloc_trim is not None
        self._malloc_trim(0)
