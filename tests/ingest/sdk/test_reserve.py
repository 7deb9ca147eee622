"""`LLMStrategy.reserve()` against a real `meterline up` and the recorded LLM endpoint: a hold
before each call, the model never called when meterline refuses it, the usage event settling
it, a failed call releasing it; sync and async clients."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import openai
import pytest

from ingest.sdk import HoldFailed, Ingestion, InsufficientBalance
from ingest.sdk.strategies import LLMStrategy
from tests.deadline import seconds_left
from tests.ingest.sdk.llm_server import RecordedLLM
from tests.processes import Server

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "What is usage-based billing?"}]


class Ledger:
    """A meter summing `_llm.total_tokens` of `llm` events, and a customer credited `units`."""

    def __init__(self, server: Server, customer: str, units: int) -> None:
        self.http = server.client()
        self.customer = customer
        clause = {"property": "name", "operator": "eq", "value": "llm"}
        meter = self.http.post(
            "/v1/meters/",
            json={
                "name": f"tokens-{uuid.uuid4().hex[:8]}",
                "filter": {"conjunction": "and", "clauses": [clause]},
                "aggregation": {"func": "sum", "property": "_llm.total_tokens"},
            },
        )
        assert meter.status_code == 201, meter.text
        self.meter = str(meter.json()["id"])
        made = self.http.post(
            "/v1/customers/", json={"external_id": customer, "email": f"{customer}@example.com"}
        )
        assert made.status_code == 201, made.text
        grant = {"external_customer_id": customer, "meter_id": self.meter, "units": units}
        credited = self.http.post("/v1/meter-credits/", json={**grant, "external_id": customer})
        assert credited.status_code == 201, credited.text

    def holds(self) -> list[dict[str, Any]]:
        found = self.http.get("/v1/meter-holds/", params={"meter_id": self.meter})
        return list(found.json()["items"])

    def customer_meter(self) -> dict[str, Any]:
        params = {"external_customer_id": self.customer, "meter_id": self.meter}
        return dict(self.http.get("/v1/customer-meters/", params=params).json()["items"][0])


def test_a_call_holds_then_its_usage_settles_the_hold(
    meterline: Server, llm: RecordedLLM, customer: str
) -> None:
    ledger = Ledger(meterline, customer, 2000)
    with Ingestion(meterline.token, base_url=meterline.url, flush_interval=60) as ingestion:
        strategy = ingestion.strategy(LLMStrategy, "llm").reserve(ledger.meter)
        client = strategy.wrap(
            openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1"), external_customer_id=customer
        )
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=300)
        [hold] = ledger.holds()
        assert (hold["units"], hold["status"]) == (300, "active")  # the output cap
        assert ingestion.flush(seconds_left())
    [hold] = ledger.holds()
    assert hold["status"] == "settled"
    cm = ledger.customer_meter()
    assert (cm["consumed_units"], cm["held_units"], cm["available"]) == (1006, 0, 994)


def test_a_refused_hold_never_calls_the_model(
    meterline: Server, llm: RecordedLLM, customer: str
) -> None:
    ledger = Ledger(meterline, customer, 100)
    with Ingestion(meterline.token, base_url=meterline.url, flush_interval=60) as ingestion:
        strategy = ingestion.strategy(LLMStrategy, "llm").reserve(
            ledger.meter, units=lambda kwargs: 40 * len(kwargs["messages"])
        )
        client = strategy.wrap(
            openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1"), external_customer_id=customer
        )
        asked = len(llm.requests)
        with pytest.raises(InsufficientBalance, match="100 units available"):
            client.chat.completions.create(model="gpt-4o-mini", messages=ASK * 3)  # 120
        assert len(llm.requests) == asked
        strategy.reserve(ledger.meter)  # the output cap: a call without one cannot hold
        with pytest.raises(HoldFailed, match="max_tokens"):
            client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
        assert len(llm.requests) == asked
    assert ledger.holds() == []


def test_async_calls_hold_and_a_failed_call_releases(
    meterline: Server, llm: RecordedLLM, customer: str
) -> None:
    ledger = Ledger(meterline, customer, 5000)
    with Ingestion(meterline.token, base_url=meterline.url, flush_interval=60) as ingestion:
        strategy = ingestion.strategy(LLMStrategy, "llm").reserve(ledger.meter)

        async def main() -> None:
            good = strategy.wrap(
                openai.AsyncOpenAI(api_key="k", base_url=f"{llm.url}/v1"),
                external_customer_id=customer,
            )
            await good.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=50)
            broken = strategy.wrap(
                openai.AsyncOpenAI(api_key="k", base_url=f"{llm.url}/nowhere", max_retries=0),
                external_customer_id=customer,
            )
            with pytest.raises(openai.NotFoundError):
                await broken.chat.completions.create(
                    model="gpt-4o-mini", messages=ASK, max_tokens=70
                )

        asyncio.run(main())
        assert ingestion.flush(seconds_left())
    statuses = sorted((h["units"], h["status"]) for h in ledger.holds())
    assert statuses == [(50, "settled"), (70, "released")]
    assert ledger.customer_meter()["available"] == 5000 - 1006


def test_reserve_needs_meterlines_http_api() -> None:
    with Ingestion(transport=_NoHTTP()) as ingestion:
        with pytest.raises(ValueError, match="base_url"):
            ingestion.strategy(LLMStrategy, "llm").reserve("m")
        strategy = ingestion.strategy(LLMStrategy, "llm").reserve(
            "m", base_url="http://127.0.0.1:9"
        )
        client = strategy.wrap(openai.OpenAI(api_key="k"), external_customer_id="c")
        with pytest.raises(HoldFailed, match="no answer"):
            client.chat.completions.create(model="m", messages=ASK, max_tokens=1)


class _NoHTTP:
    def send(self, events: Any) -> Any:
        raise AssertionError("nothing is sent")

    def close(self) -> None:
        return None
