"""Reads after writes across cores (`api.read_after`): every answer says how far the control
topic is applied here, and a read asking for more waits for it, or is answered 503; a request
naming events (`Meterline-Events-After`) waits until the partitions this core reads are applied
that far, and a correction waits for the events acknowledged here to its organization too."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from aggregator.api.read_after import EventsApplied, read_after
from ingest.http import EVENTS_AFTER_HEADER, OFFSET_HEADER, READ_AFTER_HEADER, Acknowledged

TOKEN = "mlt_oat_t"
ORG = "org"


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


def _app(applied: Applied, events: EventsApplied) -> Starlette:
    async def read(request: Request) -> PlainTextResponse:
        seen = request.headers.get(EVENTS_AFTER_HEADER, "")
        return PlainTextResponse(f"read at {applied.through} {dict(events.applied())} {seen}")

    routes = [Route("/r", read), Route("/v1/events/void", read, methods=["POST"])]
    return Starlette(routes=routes, middleware=[read_after(applied, events, 0.5)])


def _events(
    applied: dict[int, int] | None = None, acknowledged: Acknowledged | None = None
) -> EventsApplied:
    """A core reading partitions 0 and 1 of three, applied as `applied` says."""
    found = applied if applied is not None else {}
    return EventsApplied(
        lambda: found, lambda p: p < 2, acknowledged or Acknowledged(), {TOKEN: ORG}.get
    )


async def _client(applied: Applied, events: EventsApplied | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=_app(applied, events or _events()))
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
            assert answer.text.startswith("read at 5 ") and answer.headers[OFFSET_HEADER] == "5"
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


def test_a_request_naming_events_waits_for_the_partitions_read_here() -> None:
    async def run() -> None:
        offsets = {0: 10}
        async with await _client(Applied(0), _events(offsets)) as client:
            # Partition 2 is another shard's: never waited for.
            named = {EVENTS_AFTER_HEADER: "0:12,1:3,2:999"}
            asking = asyncio.create_task(client.get("/r", headers=named))
            await asyncio.sleep(0.1)
            offsets[0] = 12
            await asyncio.sleep(0.1)
            assert not asking.done()
            offsets[1] = 3
            assert (await asking).status_code == 200
            late = await client.get("/r", headers={EVENTS_AFTER_HEADER: "0:13"})
            assert late.status_code == 503 and late.json()["error"] == "NotCaughtUp"
            assert late.headers["retry-after"] == "1"
            bad = await client.get("/r", headers={EVENTS_AFTER_HEADER: "0-13"})
            assert bad.status_code == 400 and EVENTS_AFTER_HEADER in bad.json()["detail"]

    asyncio.run(run())


def test_a_correction_waits_for_the_events_acknowledged_here_and_carries_them_on() -> None:
    async def run() -> None:
        offsets = {0: 4, 1: 7}
        acknowledged = Acknowledged()
        acknowledged.add(ORG, [(0, 5)])
        async with await _client(Applied(0), _events(offsets, acknowledged)) as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            asking = asyncio.create_task(
                client.post("/v1/events/void", headers={**auth, EVENTS_AFTER_HEADER: "1:6"})
            )
            await asyncio.sleep(0.1)
            assert not asking.done()  # 0:5 is this core's own acknowledgement
            offsets[0] = 5
            answer = await asking
            assert answer.status_code == 200
            assert answer.text.endswith(" 0:5,1:6")  # what a shard it is sent to waits for
            # Not a correction: this core's acknowledgements are not waited for.
            offsets[0] = 0
            assert (await client.get("/r", headers=auth)).status_code == 200

    asyncio.run(run())
