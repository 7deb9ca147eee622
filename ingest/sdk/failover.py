"""Several URLs of one meterline (its edges, or several load balancers) and one call's way
through them: every request the SDK makes (a batch of events, a balance check, a credit, a
hold) takes these steps, each named where the code takes it.

1. Order: the URLs that answered last, in the order given (the first is used while it answers),
   then those that failed, the one due for another try first. A URL that failed is tried again
   1 s later, then 2, 4, ... up to 30 s while it keeps failing: by the one call that finds it
   due, which asks it first (the other calls meanwhile pass it by, so they pay no failed
   attempt); an answer puts it back in its place.
2. Attempt: each URL of the order at most once, each attempt bounded by `timeout` and by what is
   left of the call's `deadline` (default: `timeout` per URL).
3. Fail over: no answer (connection refused or broken, a timeout) or a 502, 503 or 504 sends
   the same request to the next URL at once. Every write the SDK sends is idempotent (events
   carry their external_id; credits and holds their external_id and one Idempotency-Key per
   call), so a request that reached a server before it failed is still applied once.
4. Answer: the first other answer; when no URL gave one, the last 502, 503 or 504, else
   TransportError saying what each URL did.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx

from ingest.sdk.errors import TransportError

__all__ = ["Servers"]

FAILOVER_STATUSES = frozenset({502, 503, 504})
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0

Clock = Callable[[], float]


def urls_of(urls: str | Sequence[str]) -> tuple[str, ...]:
    """One URL or several, without trailing slashes; ValueError for none, a repeat or a
    non-URL."""
    found = (urls,) if isinstance(urls, str) else tuple(urls)
    if not found:
        raise ValueError("base_url: give at least one URL")
    cleaned = []
    for url in found:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: {url!r} is not an http:// or https:// URL")
        cleaned.append(url.rstrip("/"))
    if len(set(cleaned)) < len(cleaned):
        raise ValueError(f"base_url: a URL is given twice in {list(found)}")
    return tuple(cleaned)


def _retry_after(failures: int) -> float:
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** min(failures - 1, 30))


@dataclass(slots=True)
class _Health:
    failures: int = 0  # in a row; 0: answering
    due: float = 0.0  # when it may be tried again (while failing)
    probing: bool = False  # one call has it first in its order (step 1)


class Servers:
    """The URLs of one meterline and what the calls learned of them (step 1); one per client,
    shared by its sender threads (or tasks), its API calls and its strategies' holds."""

    def __init__(self, urls: str | Sequence[str], *, clock: Clock = time.monotonic) -> None:
        self.urls = urls_of(urls)
        self.clock = clock
        self._lock = threading.Lock()  # held briefly, never across I/O
        self._health = {url: _Health() for url in self.urls}

    def __repr__(self) -> str:
        return f"Servers({list(self.urls)!r})"

    def order(self) -> list[str]:
        """Step 1: the URLs in the order one call tries them (a due URL is claimed for it)."""
        now = self.clock()
        with self._lock:
            health = self._health
            up = [url for url in self.urls if health[url].failures == 0]
            down = sorted(
                (url for url in self.urls if health[url].failures), key=lambda url: health[url].due
            )
            if down and health[down[0]].due <= now:
                probe = down.pop(0)
                health[probe].probing = True
                health[probe].due = now + _retry_after(health[probe].failures)
                return [probe, *up, *down]
            return [*up, *down]

    def failed(self, url: str) -> None:
        """Step 3: `url` gave no answer, or a 502, 503 or 504."""
        with self._lock:
            health = self._health[url]
            if health.failures and not health.probing:
                return  # a call that began before it failed: already counted
            health.failures += 1
            health.probing = False
            health.due = self.clock() + _retry_after(health.failures)

    def answered(self, url: str) -> None:
        with self._lock:
            self._health[url] = _Health()

    def attempts(self, timeout: float, deadline: float | None) -> Attempts:
        return Attempts(self, timeout, deadline)


class Attempts:
    """One call's attempts (steps 2 to 4), without I/O: iterate for (url, seconds), then tell
    what each did."""

    def __init__(self, servers: Servers, timeout: float, deadline: float | None) -> None:
        self._servers = servers
        self._order = servers.order()
        self._timeout = timeout
        now = servers.clock()
        self._end = now + (timeout * len(self._order) if deadline is None else deadline)
        self.last: httpx.Response | None = None  # the last 502, 503 or 504
        self._reasons: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, float]]:
        """Step 2."""
        for url in self._order:
            left = self._end - self._servers.clock()
            if left <= 0:
                self._reasons.append("the call's deadline passed")
                return
            yield url, min(self._timeout, left)

    def unanswered(self, url: str, exc: BaseException) -> None:
        """Step 3: no answer."""
        self._servers.failed(url)
        kind = "TimeoutError" if isinstance(exc, TimeoutError) else type(exc).__name__
        self._reasons.append(f"{url}: {kind}: {exc}".rstrip(": "))

    def final(self, url: str, response: httpx.Response) -> bool:
        """Steps 3 and 4: whether `response` is the call's answer (else the next URL)."""
        if response.status_code in FAILOVER_STATUSES:
            self._servers.failed(url)
            self.last = response
            self._reasons.append(f"{url}: HTTP {response.status_code}")
            return False
        self._servers.answered(url)
        return True

    def outcome(self) -> httpx.Response:
        """Step 4, when no URL answered otherwise."""
        if self.last is not None:
            return self.last
        raise TransportError("; ".join(self._reasons))


Attempt = Callable[[str, float], httpx.Response]
AsyncAttempt = Callable[[str, float], Awaitable[httpx.Response]]


def first_answer(attempts: Attempts, attempt: Attempt) -> httpx.Response:
    """Steps 2 to 4, blocking: `attempt(url, seconds)` sends the request once."""
    for url, seconds in attempts:
        try:
            response = attempt(url, seconds)
        except httpx.HTTPError as exc:
            attempts.unanswered(url, exc)
            continue
        if attempts.final(url, response):
            return response
    return attempts.outcome()


async def afirst_answer(attempts: Attempts, attempt: AsyncAttempt) -> httpx.Response:
    """Steps 2 to 4 on the event loop (each attempt bounded as a whole, not per read)."""
    for url, seconds in attempts:
        try:
            async with asyncio.timeout(seconds):
                response = await attempt(url, seconds)
        except (httpx.HTTPError, TimeoutError) as exc:
            attempts.unanswered(url, exc)
            continue
        if attempts.final(url, response):
            return response
    return attempts.outcome()
