"""Reads after writes across cores (`api.read_after`): every answer says how far the control
topic is applied here, and a read asking for more waits for it, or is answered 503."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from aggregator.api.read_after import read_after
from ingest.http import OFFSET_HEADER, READ_AFTER_HEADER


class Applied:
    """How far a core has applied the control topic, moved by the test."""

    def __init__(self, through: int) -> None:
        self.through = through
        self._moved = asyncio.Event()

    def move(self, through: int) -> None:
        self.through = through
        self._moved.set()
        self._moved = asyncio.Event()

    async def reached(self, offset: int) -> None:
        while self.through < offset:
            await self._moved.wait()


def _app(applied: Applied) -> Starlette:
    async def read(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"read at {applied.through}")

    return Starlette(routes=[Route("/r", read)], middleware=[read_after(applied, 0.5)])


async def _client(applied: Applied) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=_app(applied))
    return httpx.AsyncClient(transport=transport, base_url="http://core")


def test_every_answer_says_how_far_the_control_topic_is_applied() -> None:
    async def run() -> None:
        async with await _client(Applied(12)) as client:
            answer = await client.get("/r")
            assert answer.status_code == 200 and answer.headers[OFFSET_HEADER] == "12"

    asyncio.run(run())


def test_a_read_after_an_offset_waits_until_it_is_applied() -> None:
    async def run() -> None:
        applied = Applied(3)
        async with await _client(applied) as client:
            asking = asyncio.create_task(client.get("/r", headers={READ_AFTER_HEADER: "5"}))
            await asyncio.sleep(0.1)
            applied.move(4)
            await asyncio.sleep(0.1)
            assert not asking.done()
            applied.move(5)
            answer = await asking
            assert answer.text == "read at 5" and answer.headers[OFFSET_HEADER] == "5"
            # Already applied: answered at once.
            assert (await client.get("/r", headers={READ_AFTER_HEADER: "2"})).status_code == 200

    asyncio.run(run())


def test_a_core_that_has_not_caught_up_answers_503() -> None:
    async def run() -> None:
        async with await _client(Applied(3)) as client:
            answer = await client.get("/r", headers={READ_AFTER_HEADER: "9"})
            assert answer.status_code == 503 and answer.json()["error"] == "NotCaughtUp"
            assert answer.headers["retry-after"] == "1"
            bad = await client.get("/r", headers={READ_AFTER_HEADER: "soon"})
            assert bad.status_code == 400 and READ_AFTER_HEADER in bad.json()["detail"]

    asyncio.run(run())
