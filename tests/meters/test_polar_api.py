"""The upstream client's answers and failure paths, on a mock transport (the network is not
the point here; the forwarder and reconcile tests run it against real servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import orjson
import pytest

from meters.polar_api import ApiError, PolarApi
from meters.upstream import Accepted, Rejected, RetryLater

EVENTS = [{"name": "a", "external_id": "e1"}, {"name": "b", "external_id": "e2"}]
Handler = Callable[[httpx.Request], httpx.Response]


def _api(handler: Handler, attempts: int = 3) -> PolarApi:
    return PolarApi(
        "http://upstream.test/", "tok", attempts=attempts, transport=httpx.MockTransport(handler)
    )


def _send(handler: Handler) -> object:
    async def run() -> object:
        async with _api(handler) as api:
            return await api.send(EVENTS)

    return asyncio.run(run())


def test_a_batch_is_sent_with_the_token_and_its_answer_counted() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"inserted": 1, "duplicates": 1})

    assert _send(handler) == Accepted(1, 1)
    assert seen[0].url == "http://upstream.test/v1/events/ingest"
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert orjson.loads(seen[0].content) == {"events": EVENTS}


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(429, headers={"Retry-After": "7"}), RetryLater("HTTP 429", 7.0)),
        (httpx.Response(503), RetryLater("HTTP 503", None)),
        (httpx.Response(401, text="no"), RetryLater("HTTP 401: no")),
        (httpx.Response(200, json={"inserted": 1, "duplicates": 0}), None),
    ],
)
def test_answers_that_keep_the_batch_for_later(
    response: httpx.Response, expected: RetryLater | None
) -> None:
    outcome = _send(lambda request: response)
    assert isinstance(outcome, RetryLater)
    if expected is not None:
        assert outcome == expected
    else:
        assert outcome.reason == "upstream counted Accepted(inserted=1, duplicates=0) of 2 events"


def test_a_refusal_names_each_refused_event() -> None:
    detail = [{"loc": ["body", "events", 1, "name"], "msg": "too long", "type": "x"}]
    outcome = _send(lambda request: httpx.Response(422, json={"detail": detail}))
    assert outcome == Rejected({1: "name: too long"})


def test_timeouts_and_broken_connections_are_retried_later() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    assert _send(timeout) == RetryLater("timeout")
    assert _send(refused) == RetryLater("connection: ConnectError")


def test_reads_ride_out_429_and_5xx_then_give_up() -> None:
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(502), None, None]
    )
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        answer = next(answers)
        return answer or httpx.Response(200, json={"items": [], "pagination": {"max_page": 0}})

    async def run() -> list[object]:
        async with _api(handler) as api:
            return [m async for m in api.items("/v1/meters/", {})]

    assert asyncio.run(run()) == []
    assert calls == ["/v1/meters/"] * 3

    async def failing() -> None:
        async with _api(lambda request: httpx.Response(500, text="down"), attempts=2) as api:
            await api.request("GET", "/v1/meters/")

    with pytest.raises(ApiError, match="HTTP 500"):
        asyncio.run(failing())


def test_a_refused_read_fails_at_once() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(404, text="missing")

    async def run() -> None:
        async with _api(handler) as api:
            await api.request("GET", "/v1/meters/x")

    with pytest.raises(ApiError, match="HTTP 404"):
        asyncio.run(run())
    assert calls == 1


def test_the_client_exists_only_inside_async_with() -> None:
    api = _api(lambda request: httpx.Response(200, json={"inserted": 2, "duplicates": 0}))

    async def run() -> object:
        with pytest.raises(RuntimeError, match="outside"):
            await api.send(EVENTS)
        async with api:
            sent = await api.send(EVENTS)
        with pytest.raises(RuntimeError, match="outside"):
            await api.send(EVENTS)
        return sent

    assert asyncio.run(run()) == Accepted(2, 0)
