"""Several URLs of one meterline (`ingest.sdk.failover`): the order calls try them in (a law,
under any sequence of answers, failures and time), and the clients' calls through it, with the
network replaced by `httpx.MockTransport` (what each URL answers is the point, not a server):
reads and writes go on to the next URL at once on no answer, 502, 503 or 504, writes with the
same external ids and Idempotency-Key; other answers are final; the deadline bounds a call.
Then holds, through a URL where nothing listens and a real meterline."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.sdk import AsyncIngestion, Ingestion, RequestFailed
from ingest.sdk.failover import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, Servers
from ingest.sdk.strategies import LLMStrategy
from ingest.sdk.transports import AsyncHTTPTransport, HTTPTransport
from tests.deadline import seconds_left
from tests.ingest.sdk.llm_server import RecordedLLM
from tests.ingest.sdk.test_reserve import ASK, Ledger
from tests.processes import Server, free_port

A, B, C = "http://a.test", "http://b.test", "http://c.test"
CHECK = {"allowed": True, "units": 1.0, "balance": 10.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- The order: a law under any sequence of steps --------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("fail"), st.sampled_from([A, B, C])),
        st.tuples(st.just("answer"), st.sampled_from([A, B, C])),
        st.tuples(st.just("wait"), st.floats(0, 40)),
        st.tuples(st.just("order"), st.none()),
    ),
    max_size=40,
)


@given(steps=STEPS)
def test_answering_urls_go_first_in_their_order_and_a_failed_one_is_tried_again(
    steps: list[tuple[str, Any]],
) -> None:
    clock = Clock()
    servers = Servers([A, B, C], clock=clock)
    failing: dict[str, float] = {}  # url: when it last failed while answering
    probed_at: dict[str, float] = {}
    for kind, value in steps:
        if kind == "fail":
            servers.failed(value)
            failing.setdefault(value, clock.now)
        elif kind == "answer":
            servers.answered(value)
            failing.pop(value, None)
        elif kind == "wait":
            clock.now += value
        order = servers.order()
        assert sorted(order) == [A, B, C]
        # The answering URLs in the order given, then the failed ones; a probe (a failed URL
        # due again) may lead.
        up = [url for url in order if url not in failing]
        probe = order[0] if up and order[0] in failing else None
        rest = order[1:] if probe else order
        assert rest[: len(up)] == up == sorted(up)
        if probe:
            # Not before its first retry time, and one call at a time: the next order, at the
            # same instant, leaves it behind every answering URL.
            assert clock.now - failing[probe] >= RETRY_FIRST_SECONDS
            assert probed_at.get(probe) != clock.now
            probed_at[probe] = clock.now
            assert servers.order().index(probe) >= len(up)
    # Never abandoned: once the longest wait has passed, a failed URL is asked first.
    if failing:
        clock.now += RETRY_MAX_SECONDS
        assert servers.order()[0] in failing


def test_one_call_probes_a_failed_url_the_others_pass_it_by() -> None:
    clock = Clock()
    servers = Servers([A, B], clock=clock)
    for _ in range(8):  # many calls in flight when it died: one failure, not eight
        servers.failed(A)
    assert servers.order() == [B, A]
    clock.now += RETRY_FIRST_SECONDS
    assert servers.order() == [A, B]  # this call probes it
    assert servers.order() == [B, A]  # the others do not
    servers.failed(A)  # the probe failed: twice as long before the next one
    clock.now += RETRY_FIRST_SECONDS
    assert servers.order() == [B, A]
    clock.now += RETRY_FIRST_SECONDS
    assert servers.order() == [A, B]
    servers.answered(A)
    assert servers.order() == [A, B] == servers.order()


def test_urls_are_checked() -> None:
    assert Servers("http://a.test/").urls == ("http://a.test",)
    for bad in ([], ["a.test"], [A, A + "/"]):
        with pytest.raises(ValueError, match="base_url"):
            Servers(bad)


# --- The clients' calls, each URL answering as a handler says ---------------------------------


class Network:
    """What each URL does with a request (`plan[url]`: answers in turn, the last repeated);
    every request seen, by URL."""

    def __init__(self, plan: dict[str, list[int | type[Exception]]], clock: Clock) -> None:
        self.plan = plan
        self.seen: list[tuple[str, httpx.Request]] = []
        self.clock = clock
        self.spend = 0.0  # seconds each attempt takes (on the clock)

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}"
        self.seen.append((url, request))
        self.clock.now += self.spend
        answers = self.plan[url]
        what = answers.pop(0) if len(answers) > 1 else answers[0]
        if not isinstance(what, int):
            raise what("down", request=request)
        body = CHECK if request.url.path.endswith("/check") else {"inserted": 1, "duplicates": 0}
        if request.method == "POST" and "credits" in request.url.path:
            body = {"customer_meter": {}, "replayed": False}
        return httpx.Response(what, json=body if what < 300 else {"error": f"E{what}"})

    def urls(self) -> list[str]:
        return [url for url, _ in self.seen]

    def sync(self, urls: list[str], **kwargs: Any) -> Ingestion:
        transport = HTTPTransport(
            Servers(urls, clock=self.clock),
            "tok",
            transport=httpx.MockTransport(self.handle),
            **kwargs,
        )
        return Ingestion(transport=transport, flush_at_exit=False, backoff_base=0.01)

    def asynchronous(self, urls: list[str], **kwargs: Any) -> AsyncIngestion:
        async def handle(request: httpx.Request) -> httpx.Response:
            return self.handle(request)

        transport = AsyncHTTPTransport(
            Servers(urls, clock=self.clock),
            "tok",
            transport=httpx.MockTransport(handle),
            **kwargs,
        )
        return AsyncIngestion(transport=transport, flush_at_exit=False, backoff_base=0.01)


def check(ingestion: Ingestion) -> dict[str, Any]:
    return ingestion.check_balance("m", external_customer_id="c")


@pytest.mark.parametrize("down", [httpx.ConnectError, httpx.ReadTimeout, 502, 503, 504])
def test_a_read_goes_on_at_once_and_later_reads_skip_the_failed_url(
    down: int | type[Exception],
) -> None:
    network = Network({A: [down], B: [200]}, Clock())
    with network.sync([A, B]) as ingestion:
        assert check(ingestion) == CHECK
        assert check(ingestion) == CHECK
    assert network.urls() == [A, B, B]


def test_writes_go_on_with_the_same_external_ids_and_key() -> None:
    """A's connection breaks after the request reached it (it may have applied it): B gets the
    same body and the same Idempotency-Key."""
    network = Network({A: [httpx.ReadError, 200], B: [200]}, Clock())
    with network.sync([A, B]) as ingestion:
        ids = [ingestion.ingest({"name": "e", "external_customer_id": "c"}) for _ in range(3)]
        assert ingestion.flush(seconds_left())
        network.clock.now += RETRY_FIRST_SECONDS  # A is asked again, and answers
        ingestion.credit("m", 5, external_customer_id="c")
        network.plan[A] = [httpx.RemoteProtocolError]
        ingestion.credit("m", 7, external_customer_id="c", external_id="mine")
        stats = ingestion.stats()
    assert network.urls() == [A, B, A, A, B]
    batches = [orjson.loads(r.content) for _, r in network.seen[:2]]
    assert batches[0] == batches[1]
    assert [e["external_id"] for e in batches[0]["events"]] == ids
    assert (stats.delivered, stats.retries) == (3, 0)  # went on at once, no retry's wait
    sent, again = network.seen[3][1], network.seen[4][1]
    assert orjson.loads(sent.content) == orjson.loads(again.content)
    assert orjson.loads(again.content)["external_id"] == "mine"
    key = sent.headers["idempotency-key"]
    assert key == again.headers["idempotency-key"]
    assert key != network.seen[2][1].headers["idempotency-key"]  # one key per call
    assert orjson.loads(network.seen[2][1].content)["external_id"].startswith("mlsdk_credit_")


@pytest.mark.parametrize("status", [200, 404, 422, 500, 429])
def test_any_other_answer_is_the_calls(status: int) -> None:
    network = Network({A: [status], B: [200]}, Clock())
    with network.sync([A, B]) as ingestion:
        if status == 200:
            assert check(ingestion) == CHECK
        else:
            with pytest.raises(RequestFailed) as failed:
                check(ingestion)
            assert failed.value.status == status
            assert failed.value.answer == {"error": f"E{status}"}
    assert network.urls() == [A]


def test_when_no_url_answers_the_call_says_what_each_did() -> None:
    network = Network({A: [httpx.ConnectError], B: [503]}, Clock())
    with network.sync([A, B]) as ingestion:
        with pytest.raises(RequestFailed) as failed:
            check(ingestion)  # the last 503 is the answer
        assert failed.value.status == 503
        network.plan[B] = [httpx.ConnectError]
        with pytest.raises(RequestFailed, match="no answer") as failed:
            check(ingestion)
        assert failed.value.status is None
        assert "http://b.test: ConnectError" in str(failed.value)


def test_a_deadline_bounds_the_call_and_each_attempt() -> None:
    network = Network({A: [httpx.ReadTimeout], B: [200]}, Clock())
    network.spend = 3.0  # each attempt takes 3 s
    with (
        network.sync([A, B], timeout=2.5, deadline=2.0) as ingestion,
        pytest.raises(RequestFailed, match="deadline"),
    ):
        check(ingestion)
    assert network.urls() == [A]
    assert network.seen[0][1].extensions["timeout"]["read"] == 2.0
    # Without a deadline: `timeout` per URL.
    network = Network({A: [httpx.ReadTimeout], B: [200]}, Clock())
    network.spend = 2.0
    with network.sync([A, B], timeout=2.5) as ingestion:
        assert check(ingestion) == CHECK
    assert [r.extensions["timeout"]["read"] for _, r in network.seen] == [2.5, 2.5]


def test_one_url_answers_as_before() -> None:
    """A 503 from the only URL is the send's answer: the batch waits and is sent again."""
    network = Network({A: [503, 200]}, Clock())
    with network.sync([A]) as ingestion:
        ingestion.ingest({"name": "e", "external_customer_id": "c"})
        assert ingestion.flush(seconds_left())
        assert (ingestion.stats().delivered, ingestion.stats().retries) == (1, 1)
    assert network.urls() == [A, A]


def test_the_async_client_goes_on_the_same_way() -> None:
    network = Network({A: [httpx.ConnectError], B: [200]}, Clock())

    async def main() -> None:
        async with network.asynchronous([A, B]) as ingestion:
            assert await ingestion.check_balance("m", customer_id="c-id") == CHECK
            ingestion.ingest({"name": "e", "external_customer_id": "c"})
            assert await ingestion.flush(seconds_left())
            await ingestion.credit("m", 1, external_customer_id="c")

    asyncio.run(main())
    assert network.urls() == [A, B, B, B]


def test_base_url_takes_a_list_and_one_url_as_before() -> None:
    def urls(make: Callable[[], Ingestion]) -> tuple[str, ...]:
        with make() as ingestion:
            endpoint = ingestion.http_endpoint
            assert endpoint is not None
            return endpoint[0].urls

    assert urls(lambda: Ingestion("t", base_url=[A, B + "/"])) == (A, B)
    assert urls(lambda: Ingestion("t", server_url=A)) == (A,)
    assert urls(lambda: Ingestion("t")) == ("https://api.polar.sh",)
    with pytest.raises(ValueError, match="at least one"):
        Ingestion("t", base_url=[])


# --- Holds, through a URL where nothing listens and a real meterline --------------------------


@pytest.mark.slow
def test_a_hold_goes_on_to_the_url_that_answers(
    meterline: Server, llm: RecordedLLM, customer: str
) -> None:
    ledger = Ledger(meterline, customer, 2000)
    dead = f"http://127.0.0.1:{free_port()}"
    assert meterline.token is not None
    with Ingestion(meterline.token, base_url=[dead, meterline.url]) as ingestion:
        strategy = ingestion.strategy(LLMStrategy, "llm").reserve(ledger.meter)
        client = strategy.wrap(
            openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1"), external_customer_id=customer
        )
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=100)
        assert ingestion.flush(seconds_left())
        assert ingestion.check_balance(ledger.meter, 1, external_customer_id=customer)["allowed"]
    [hold] = ledger.holds()
    assert (hold["units"], hold["status"]) == (100, "settled")
    grant = {"external_customer_id": customer, "external_id": f"credit-{uuid.uuid4().hex}"}
    with Ingestion(meterline.token, base_url=[dead, meterline.url]) as ingestion:
        first = ingestion.credit(ledger.meter, 10, **grant)
        again = ingestion.credit(ledger.meter, 10, **grant)  # the same credit, sent again later
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["customer_meter"]["credited_units"] == 2010
