"""The client of a Polar-compatible API (Polar itself, or a meterline): sending an ingest batch
(one attempt, its answer classified for the sender), and reading: paced GETs that ride out
429s and 5xx, page-by-page lists, and every event of a time window.

Polar pages with an offset and at most 100 items, sorted by timestamp alone, so deep pages are
slow and ties may move between requests. Events are therefore read by splitting the window in
time until each piece fits in one page (its first page says how many it holds); only a piece
that cannot be split (more than a page at one microsecond) is paged.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from meters.errors import MetersError
from meters.http_answers import (
    ANSWER_BYTES,
    AnswerTooLarge,
    UnreadableAnswer,
    excerpt,
    keep_secrets_out_of_logs,
    read_whole,
)
from meters.times import us_to_iso
from meters.upstream import Outcome, Pacer, RetryLater, backoff, read_answer, retry_after

PAGE = 100  # Polar's largest page
PER_PIECE = 75  # aim below a page so that most pieces need one request
MAX_PARTS = 1024  # bounds the requests spent on empty pieces when events cluster in time


class ApiError(MetersError):
    """The API refused a read (authentication, a missing resource, a bad parameter)."""


class PolarApi:
    """An async context manager around one httpx client, opened on entry and closed on exit.
    `transport` replaces the network (tests: `httpx.MockTransport`, `httpx.ASGITransport`).
    An answer is read whole up to `answer_bytes` (decoded), an error's first 500 bytes only:
    a larger answer is an ApiError (`send`: RetryLater), never read further."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        rate_per_minute: float | None = None,
        timeout_seconds: float = 30.0,
        attempts: int = 8,
        answer_bytes: int = ANSWER_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        before_send: Callable[[], None] | None = None,
    ) -> None:
        """`before_send`: called as each `send` is about to go out, after its pacing; what
        it raises is raised, and nothing is sent (the forwarder's: this core leads no more)."""
        self.url = url.rstrip("/")
        self._before_send = before_send
        self._answer_bytes = answer_bytes
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._timeout = timeout_seconds
        self._transport = transport
        self._open: httpx.AsyncClient | None = None
        self._pacer = Pacer(rate_per_minute) if rate_per_minute else None
        self._attempts = attempts
        self.requests = 0

    async def __aenter__(self) -> Self:
        if self._open is not None:
            raise RuntimeError("PolarApi is already open")
        keep_secrets_out_of_logs()
        self._open = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=self._timeout,
            transport=self._transport,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._open = self._open, None
        if client is not None:
            await client.aclose()

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._open is None:
            raise RuntimeError("PolarApi is used outside `async with`")
        return self._open

    async def send(self, events: list[dict[str, Any]]) -> Outcome:
        """One `POST /v1/events/ingest`; re-sending is safe when every event has an
        external_id (the upstream deduplicates on it)."""
        if self._pacer is not None:
            await self._pacer.wait()
        if self._before_send is not None:
            self._before_send()
        self.requests += 1
        body = orjson.dumps({"events": events})
        try:
            async with self._client.stream("POST", "/v1/events/ingest", content=body) as response:
                answer = await read_whole(response, self._answer_bytes)
        except httpx.TimeoutException:
            # The upstream may have stored the batch: re-sending it is safe (external_ids).
            return RetryLater("timeout")
        except httpx.TransportError as exc:
            return RetryLater(f"connection: {exc.__class__.__name__}")
        except (AnswerTooLarge, UnreadableAnswer) as exc:
            return RetryLater(f"HTTP {response.status_code}, {exc}")
        return read_answer(response, answer, len(events))

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; retried after Retry-After or a backoff on 429, 5xx and I/O errors."""
        for attempt in range(1, self._attempts + 1):
            if self._pacer is not None:
                await self._pacer.wait()
            self.requests += 1
            wait: float | None = None
            try:
                async with self._client.stream(method, path, **kwargs) as response:
                    if response.status_code < 300:
                        return orjson.loads(await read_whole(response, self._answer_bytes))
                    said = await excerpt(response, 500)
            except httpx.TransportError as exc:
                problem = f"{exc.__class__.__name__} from {self.url}{path}"
            except (AnswerTooLarge, UnreadableAnswer) as exc:
                raise ApiError(
                    f"HTTP {response.status_code} from {self.url}{path}: {exc}"
                ) from None
            else:
                problem = f"HTTP {response.status_code} from {self.url}{path}: {said}"
                if response.status_code != 429 and response.status_code < 500:
                    raise ApiError(problem[:500])
                wait = retry_after(response.headers.get("retry-after"))
            if attempt == self._attempts:
                raise ApiError(problem[:500])
            await asyncio.sleep(wait if wait is not None else backoff(attempt, 30.0))
        raise AssertionError("unreachable")

    async def items(self, path: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Every item of a paginated list."""
        page = 1
        while True:
            answer = await self.request("GET", path, params={**params, "page": page, "limit": PAGE})
            for item in answer["items"]:
                yield item
            if page >= answer["pagination"]["max_page"]:
                return
            page += 1

    async def events(
        self,
        start_us: int,
        end_us: int,
        on_total: Callable[[int], None] | None = None,
        *,
        voided: bool = False,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every event with start_us <= timestamp < end_us, a page at a time, oldest first.
        `on_total` hears the window's event count as soon as it is known. `voided`: voided
        events too (a meterline's `voided=true`; Polar has none)."""
        pieces = [(start_us, end_us - 1)]  # the API's end bound is inclusive
        first = True
        while pieces:
            low, high = pieces.pop()
            answer = await self._events_page(low, high, 1, voided)
            total = int(answer["pagination"]["total_count"])
            if first and on_total is not None:
                on_total(total)
            first = False
            if total <= PAGE or high == low:
                yield answer["items"]
                for page in range(2, int(answer["pagination"]["max_page"]) + 1):
                    yield (await self._events_page(low, high, page, voided))["items"]
                continue
            parts = min(math.ceil(total / PER_PIECE), MAX_PARTS, high - low + 1)
            step = (high - low + 1) / parts
            bounds = [low + round(i * step) for i in range(parts)] + [high + 1]
            pieces.extend((a, b - 1) for a, b in reversed(list(itertools.pairwise(bounds))))

    async def _events_page(self, low: int, high: int, page: int, voided: bool) -> Any:
        params: dict[str, Any] = {
            "start_timestamp": us_to_iso(low),
            "end_timestamp": us_to_iso(high),
            "sorting": "timestamp",
            "page": page,
            "limit": PAGE,
        }
        if voided:
            params["voided"] = "true"
        return await self.request("GET", "/v1/events/", params=params)
