"""The edge's way to the cores (`ingest.http.cores`), against cores served on real sockets: small
apps that answer as a core does where it matters (health, the control offset, keys, streams)
and can stall, fail or stop, as a paused, a busy or a killed core does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ingest.http import OFFSET_HEADER, READ_AFTER_HEADER, CoreRouting, Cores
from tests.deadline import until
from tests.processes import free_port

TOKENS = {"token-a": "org-a", "token-b": "org-b"}


@dataclass
class FakeCore:
    """What one core saw, and how it answers next."""

    name: str
    offset: int = 0
    stall: bool = False  # answers nothing (a paused core)
    fail_writes: int = 0  # answers this many writes 504 first
    seen: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def health(request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        async def any_route(request: Request) -> Response:
            self.seen.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "key": request.headers.get("idempotency-key"),
                    "after": request.headers.get(READ_AFTER_HEADER),
                    "host": request.headers.get("host"),
                    "body": await request.body(),
                }
            )
            if self.stall:
                await asyncio.sleep(3600)
            if request.method == "POST" and self.fail_writes:
                self.fail_writes -= 1
                return JSONResponse({"error": "WriteTimeout"}, status_code=504)
            if request.url.path == "/v1/stream":
                return StreamingResponse(_ticks(), media_type="text/event-stream")
            if request.method == "POST":
                self.offset += 1
            answer = {"core": self.name, "path": request.url.path}
            return JSONResponse(answer, headers={OFFSET_HEADER: str(self.offset)})

        return Starlette(
            routes=[
                Route("/healthz", health),
                Route("/{path:path}", any_route, methods=["GET", "POST", "PATCH", "DELETE"]),
            ]
        )


async def _ticks() -> AsyncIterator[bytes]:
    for i in range(3):
        yield f"data: {i}\n\n".encode()
        await asyncio.sleep(0.3)  # pacing the stream's ticks


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """(its URL, a way to stop it: then connections are refused)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    await until("uvicorn to start", lambda: server.started)  # uvicorn has no event for it

    async def stop() -> None:
        server.should_exit = True
        server.force_exit = True
        await serving
        # One accepted as it shut down joins its connections after it asked them to close, and
        # would serve on (an edge's probe, pooled, answered a read "from a stopped core").
        for connection in list(server.server_state.connections):
            connection.shutdown()

    try:
        yield f"http://127.0.0.1:{port}", stop
    finally:
        if not serving.done():
            await stop()


@contextlib.asynccontextmanager
async def _cluster(
    cores: list[FakeCore], **routing: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Callable[[], Awaitable[None]]]]]:
    """An edge in front of `cores`: a client of the edge, and a way to stop each core."""
    async with contextlib.AsyncExitStack() as stack:
        served = [await stack.enter_async_context(_served(c.app())) for c in cores]
        settings = CoreRouting(tuple(url for url, _ in served), probe_seconds=0.2, **routing)
        router = await stack.enter_async_context(Cores(settings, TOKENS.get))
        edge = Starlette(routes=[Route("/{path:path}", router.handle, methods=["GET", "POST"])])
        edge_url, _ = await stack.enter_async_context(_served(edge))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=edge_url, timeout=30))
        yield client, {c.name: stop for c, (_, stop) in zip(cores, served, strict=True)}


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_one_organization_stays_on_one_core_until_it_dies() -> None:
    async def run() -> None:
        cores = [FakeCore("one"), FakeCore("two"), FakeCore("three")]
        async with _cluster(cores) as (edge, stops):
            answered = set()
            for _ in range(5):
                found = await edge.get("/v1/customers/", headers=_as("token-a"))
                assert found.status_code == 200
                answered.add(found.json()["core"])
            assert len(answered) == 1
            (home,) = answered
            await stops[home]()
            moved = await edge.get("/v1/customers/", headers=_as("token-a"))
            assert moved.status_code == 200 and moved.json()["core"] != home
            # Every answer since, from the same next core.
            again = await edge.get("/v1/customers/", headers=_as("token-a"))
            assert again.json()["core"] == moved.json()["core"]

    asyncio.run(run())


def test_organizations_spread_over_the_cores() -> None:
    async def run() -> None:
        cores = [FakeCore("one"), FakeCore("two")]
        async with _cluster(cores) as (edge, _):
            homes = set()
            for i in range(40):
                found = await edge.get("/v1/meters/", headers=_as(f"unknown-{i}"))
                homes.add(found.json()["core"])
            assert homes == {"one", "two"}

    asyncio.run(run())


def test_a_read_a_paused_core_holds_is_answered_by_the_next() -> None:
    async def run() -> None:
        cores = [FakeCore("one", stall=True), FakeCore("two", stall=True)]
        async with _cluster(cores, hedge_seconds=0.3) as (edge, _):
            home = None
            asking = asyncio.create_task(edge.get("/v1/customers/", headers=_as("token-a")))
            # The first core asked stalls; the other answers.
            home = await until(
                "a core to be asked", lambda: next((c for c in cores if c.seen), None)
            )
            next(c for c in cores if c is not home).stall = False
            started = time.monotonic()
            found = await asking
            assert found.status_code == 200 and found.json()["core"] != home.name
            assert time.monotonic() - started < 2

    asyncio.run(run())


def test_a_write_is_sent_again_with_the_same_key() -> None:
    async def run() -> None:
        cores = [FakeCore("one", fail_writes=1), FakeCore("two", fail_writes=1)]
        async with _cluster(cores) as (edge, _):
            written = await edge.post("/v1/customers/", headers=_as("token-a"), json={"a": 1})
            assert written.status_code == 200
            keys = [s["key"] for c in cores for s in c.seen]
            # Round the cores and back to the first: three sends, one key.
            assert len(keys) == 3 and len(set(keys)) == 1 and keys[0].startswith("edge-")
            assert all(s["body"] == b'{"a":1}' for c in cores for s in c.seen)
            mine = {"Idempotency-Key": "mine", **_as("token-a")}
            cores[0].fail_writes = cores[1].fail_writes = 1
            await edge.post("/v1/customers/", headers=mine, json={})
            again = [s["key"] for c in cores for s in c.seen if s["key"] != keys[0]]
            assert again == ["mine"] * 3

    asyncio.run(run())


def test_a_write_that_cannot_be_sent_again_is_answered_lost() -> None:
    async def run() -> None:
        cores = [FakeCore("one", stall=True), FakeCore("two", stall=True)]
        async with _cluster(cores, write_attempt_seconds=0.5) as (edge, _):
            lost = await edge.post("/v1/customer-sessions/", headers=_as("token-a"), json={})
            assert lost.status_code == 502 and lost.json()["error"] == "CoreLost"
            assert sum(len(c.seen) for c in cores) == 1

    asyncio.run(run())


def test_reads_after_a_write_ask_for_its_offset() -> None:
    async def run() -> None:
        cores = [FakeCore("one", offset=6), FakeCore("two", offset=6)]
        async with _cluster(cores) as (edge, _):
            before = await edge.get("/v1/meters/", headers=_as("token-a"))
            written = await edge.post("/v1/meters/", headers=_as("token-a"), json={})
            assert written.headers[OFFSET_HEADER] == "7"
            await edge.get("/v1/meters/", headers=_as("token-a"))
            await edge.get("/v1/meters/", headers=_as("token-b"))  # another organization
            seen = {(s["method"], s["after"]) for c in cores for s in c.seen}
            assert seen == {("GET", None), ("POST", None), ("GET", "7")}
            assert before.status_code == 200

    asyncio.run(run())


def test_the_host_and_query_reach_the_core_unchanged() -> None:
    async def run() -> None:
        cores = [FakeCore("one")]
        async with _cluster(cores) as (edge, _):
            headers = {"Host": "billing.example.com", **_as("token-a")}
            await edge.get("/v1/meters/?page=2&limit=5", headers=headers)
            (seen,) = cores[0].seen
            assert seen["host"] == "billing.example.com"
            assert seen["query"] == "page=2&limit=5"

    asyncio.run(run())


def test_a_stream_passes_through_as_it_comes() -> None:
    async def run() -> None:
        async with (
            _cluster([FakeCore("one")]) as (edge, _),
            edge.stream("GET", "/v1/stream", headers=_as("token-a")) as streamed,
        ):
            assert streamed.headers["content-type"].startswith("text/event-stream")
            arrivals = []
            async for chunk in streamed.aiter_text():
                arrivals.append((time.monotonic(), chunk))
            assert "".join(c for _, c in arrivals) == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert arrivals[-1][0] - arrivals[0][0] > 0.4  # not held until the end

    asyncio.run(run())


def test_no_core_answering_is_a_504_within_the_deadline() -> None:
    async def run() -> None:
        cores = [FakeCore("one"), FakeCore("two")]
        async with _cluster(cores, deadline_seconds=1.0) as (edge, stops):
            for stop in stops.values():
                await stop()
            started = time.monotonic()
            read = await edge.get("/v1/meters/", headers=_as("token-a"))
            write = await edge.post("/v1/meters/", headers=_as("token-a"), json={})
            assert time.monotonic() - started < 4
            for answer in (read, write):
                assert answer.status_code == 504, answer.text
                assert answer.json()["error"] == "CoreUnavailable"

    asyncio.run(run())
