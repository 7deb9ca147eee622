"""The edge's way to the cores: every request the edge does not serve itself (ingest, its health
and metrics) is sent to a live core and answered as that core answers, so a client that talks
to edges alone sees no core die.

The protocol (each step is named where the code takes it):

1. Rank: the cores (`CoreRouting.cores`) are ordered per request by rendezvous hashing of its
   organization (the bearer token's, as the edge's token view knows it; else the token), those
   that failed their last health probe or connection last: one organization's requests go to
   one core while it lives, and to the same next one when it does not.
2. Prepare: the body is read whole (within the ingest body limits), hop-by-hop headers are
   dropped and `Host` kept (the URLs a core makes then point at the edge). A write without
   `Idempotency-Key` is given a fresh one, so that sending it again applies it once. A read of
   an organization whose write this edge answered carries `Meterline-Read-After`: the control
   offset that answer carried; the core answers once it has applied the control topic that far
   (else 503, and the next core is asked). A correction of stored events carries
   `Meterline-Events-After`: where the events this edge acknowledged to the organization are
   (`positions`), so that the core applies it after them.
3. Send: a read to the first core and, unanswered after `hedge_seconds`, to the next as well
   (the first answer wins, the other is cancelled); a write to one core at a time, each for at
   most `write_attempt_seconds`.
4. Resend: a connection refused, broken or timed out, or a 502, 503 or 504 from a core, sends
   the request to the next core: a read to each core once, a write round them again with its
   key (a new leader may be being elected) until `deadline_seconds`. Then the last core's
   answer, or 504 `CoreUnavailable`. A write to a route that ignores `Idempotency-Key` (`ONCE`)
   is sent again only if it never reached a core; else 502 `CoreLost`.
5. Answer: the core's status, headers and body; a stream (`text/event-stream`) passed through
   as it comes. A write's `Meterline-Control-Offset` is kept for its organization (step 2), for
   the `organizations` most recently written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import httpx
from starlette.requests import Request
from starlette.responses import Response

from ingest.http.positions import (
    EVENTS_AFTER_HEADER,
    Acknowledged,
    format_positions,
    is_correction,
    merged,
    parse_positions,
)
from ingest.http.requests import read_body
from ingest.http.responses import HOP_BY_HOP, error, is_stream, relayed, streamed
from ingest.settings import CoreRouting
from ingest.tasks import cancel_within

log = logging.getLogger(__name__)

# What a core answers every request with (the control topic applied up to here), and what a
# read asks it to have applied first (`step 2`).
OFFSET_HEADER = "meterline-control-offset"
READ_AFTER_HEADER = "meterline-read-after"
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Writes a core applies each time they arrive, whatever their `Idempotency-Key`: a customer
# session is a new token, the forwarder's resends send again.
ONCE = ("/v1/customer-sessions/", "/v1/forwarder/")
_ROUND_PAUSE_SECONDS = 0.2  # between rounds of a write that no core took


@dataclass(frozen=True, slots=True)
class _Prepared:
    method: str
    target: str  # path and query
    headers: list[tuple[str, str]]
    body: bytes
    key: str  # the organization, or the token, or ""


class _Failed(Exception):
    """An attempt another core may answer (step 4)."""

    def __init__(self, reached: bool, answer: Response | None = None) -> None:
        super().__init__()
        self.reached = reached  # the request may have arrived
        self.answer = answer


class Cores:
    """Sends requests to the cores (the edge's catch-all route, `handle`). An async context
    manager: it probes the cores' health while open."""

    def __init__(
        self,
        routing: CoreRouting,
        organization: Callable[[str], str | None],
        acknowledged: Acknowledged | None = None,
    ) -> None:
        """`organization` names a bearer token's organization (None: unknown to the edge);
        `acknowledged`: where the events this edge acknowledged are (step 2)."""
        self._routing = routing
        self._organization = organization
        self._acknowledged = acknowledged or Acknowledged()
        self._down: set[str] = set()
        self._written: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._client: httpx.AsyncClient | None = None
        self._probing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        routing = self._routing
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(routing.deadline_seconds),
            limits=httpx.Limits(max_connections=routing.connections * len(routing.cores)),
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment between an edge and its cores
        )
        self._probing = asyncio.create_task(self._probe(), name="core-probes")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._probing, what="core routing")
        if self._client is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._routing.probe_seconds):
                    await self._client.aclose()

    async def handle(self, request: Request) -> Response:
        """Steps 1 to 5 for one request."""
        prepared = await self._prepare(request)
        ranked = self._ranked(prepared.key)
        deadline = asyncio.get_running_loop().time() + self._routing.deadline_seconds
        if prepared.method in READS:
            return await self._read(ranked, prepared, deadline)
        answer = await self._write(ranked, prepared, deadline)
        self._keep_offset(prepared.key, answer)
        return answer

    def _ranked(self, key: str) -> list[str]:
        """Step 1."""

        def weight(core: str) -> tuple[bool, bytes]:
            digest = hashlib.blake2b(f"{key}\0{core}".encode(), digest_size=8).digest()
            return core in self._down, digest

        return sorted(self._routing.cores, key=weight)

    async def _prepare(self, request: Request) -> _Prepared:
        """Step 2."""
        routing = self._routing
        body = await read_body(request, routing.max_body_bytes, routing.body_timeout_seconds)
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        key = (self._organization(token) if token else None) or token
        method = request.method
        if method not in READS and "idempotency-key" not in request.headers:
            headers.append(("idempotency-key", f"edge-{uuid.uuid4().hex}"))
        written = self._written.get(key) if key else None
        if method in READS and written is not None:
            headers.append((READ_AFTER_HEADER, str(written)))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if key and is_correction(method, request.url.path):
            given = parse_positions(request.headers.get(EVENTS_AFTER_HEADER, "")) or {}
            after = merged(given, self._acknowledged.of(key))
            if after:
                headers = [(k, v) for k, v in headers if k != EVENTS_AFTER_HEADER]
                headers.append((EVENTS_AFTER_HEADER, format_positions(after)))
        return _Prepared(method, target, headers, body, key)

    async def _read(self, ranked: list[str], prepared: _Prepared, deadline: float) -> Response:
        """Steps 3 and 4 for a read: hedged, each core once."""
        loop = asyncio.get_running_loop()
        order = iter(ranked)
        pending: set[asyncio.Task[Response]] = set()
        last: Response | None = None

        def ask_next() -> None:
            core = next(order, None)
            if core is not None:
                pending.add(asyncio.create_task(self._attempt(core, prepared)))

        ask_next()
        try:
            while pending and (remaining := deadline - loop.time()) > 0:
                wait = min(self._routing.hedge_seconds, remaining)
                done, _ = await asyncio.wait(pending, timeout=wait, return_when="FIRST_COMPLETED")
                if not done:
                    ask_next()  # hedge
                    continue
                pending -= done
                winner: Response | None = None
                for task in done:
                    try:
                        answer = task.result()
                    except _Failed as failed:
                        last = failed.answer or last
                        continue
                    if winner is None:
                        winner = answer
                    else:
                        await _discard(answer)
                if winner is not None:
                    return winner
                if not pending:
                    ask_next()
        finally:
            for task in pending:
                task.cancel()
            for found in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(found, Response):
                    await _discard(found)
        return last or _unavailable(self._routing.deadline_seconds)

    async def _write(self, ranked: list[str], prepared: _Prepared, deadline: float) -> Response:
        """Steps 3 and 4 for a write: one core at a time, round them until the deadline."""
        loop = asyncio.get_running_loop()
        once = prepared.target.startswith(ONCE)
        last: Response | None = None
        while deadline - loop.time() > 0:
            for core in ranked:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(self._routing.write_attempt_seconds, remaining)):
                        return await self._attempt(core, prepared)
                except TimeoutError:
                    reached = True  # sent, not answered: a write waiting for a leader, or a
                    # paused core; asked again elsewhere with the same key
                except _Failed as failed:
                    reached, last = failed.reached, failed.answer or last
                if once and reached:
                    return last or error(
                        502,
                        "CoreLost",
                        "The core was lost while answering: this write may have been applied.",
                    )
            await asyncio.sleep(min(_ROUND_PAUSE_SECONDS, max(0.0, deadline - loop.time())))
        return last or _unavailable(self._routing.deadline_seconds)

    async def _attempt(self, core: str, prepared: _Prepared) -> Response:
        """One core's answer (step 5), or `_Failed`."""
        assert self._client is not None
        request = self._client.build_request(
            prepared.method, core + prepared.target, headers=prepared.headers, content=prepared.body
        )
        try:
            sent = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._mark_down(core, exc)
            raise _Failed(reached=False) from None
        except httpx.TransportError as exc:
            self._mark_down(core, exc)
            raise _Failed(reached=True) from None
        if is_stream(sent):
            return streamed(sent)
        headers = sent.headers.multi_items()  # `relayed` drops hop-by-hop ones
        try:
            body = b"".join([chunk async for chunk in sent.aiter_raw()])
        except httpx.TransportError as exc:
            self._mark_down(core, exc)
            raise _Failed(reached=True) from None
        finally:
            await sent.aclose()
        answer = relayed(sent.status_code, headers, body)
        if sent.status_code in (502, 503, 504):
            raise _Failed(reached=True, answer=answer)
        return answer

    def _keep_offset(self, key: str, answer: Response) -> None:
        """Step 5: what the organization's next reads carry."""
        offset = answer.headers.get(OFFSET_HEADER)
        if not key or answer.status_code >= 500 or offset is None or not offset.isdigit():
            return
        written = self._written
        written[key] = max(int(offset), written.pop(key, 0))
        while len(written) > self._routing.organizations:
            written.popitem(last=False)

    def _mark_down(self, core: str, exc: Exception) -> None:
        if core not in self._down:
            log.warning("core %s unreachable (%s); asking the others", core, type(exc).__name__)
        self._down.add(core)

    async def _probe(self) -> None:
        """Each core's `/healthz`, every `probe_seconds`: what ranks it (step 1)."""
        assert self._client is not None
        client, every = self._client, self._routing.probe_seconds

        async def healthy(core: str) -> bool:
            try:
                found = await client.get(f"{core}/healthz", timeout=every)
            except httpx.HTTPError:
                return False
            return found.status_code == 200

        while True:
            cores = self._routing.cores
            for core, ok in zip(cores, await asyncio.gather(*map(healthy, cores)), strict=True):
                if ok and core in self._down:
                    log.info("core %s answers again", core)
                    self._down.discard(core)
                elif not ok and core not in self._down:
                    log.warning("core %s failed its health probe; asking the others", core)
                    self._down.add(core)
            await asyncio.sleep(every)


async def _discard(answer: Response) -> None:
    """An answer not sent on: a stream's connection closed."""
    if answer.background is not None:
        await answer.background()


def _unavailable(seconds: float) -> Response:
    return error(
        504,
        "CoreUnavailable",
        f"No core answered within {seconds:g} s; send the request again.",
        {"Retry-After": "1"},
    )
