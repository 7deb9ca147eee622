"""`POST /v1/traces` with real instrumentation: the `openai` client instrumented by
`opentelemetry-instrumentation-openai-v2`, calling the recorded LLM endpoint, exported by the
OTLP/HTTP exporter (protobuf, gzip) to a running meterline. The events stored are compared,
field by field, with what `LLMStrategy` sends for the same calls; an export sent again adds
nothing; a span without a customer is refused and counted; Kafka mode stores the same."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings, InstrumentedModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from aggregator import cli
from ingest.sdk import Ingestion
from ingest.sdk.strategies import LLMStrategy
from tests.deadline import wait_for
from tests.ingest.sdk.conftest import stored
from tests.ingest.sdk.llm_server import RecordedLLM
from tests.inprocess import ServedCore
from tests.processes import Broker

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "What is usage-based billing?"}]
CUSTOMER = "meterline.customer.external_id"
# Where the events of a span differ from LLMStrategy's for the same call, and why: the span
# says which strategy made it, and openai-v2 reports no cached tokens (left out, not 0).
DIFFERENT = {"strategy", "cachedInputTokens"}


@pytest.fixture
def llm() -> Iterator[RecordedLLM]:
    endpoint = RecordedLLM()
    yield endpoint
    endpoint.close()


def _exporter(core: ServedCore) -> OTLPSpanExporter:
    return OTLPSpanExporter(
        endpoint=f"{core.url}/v1/traces",
        headers={"Authorization": f"Bearer {core.token}"},
        compression=Compression.Gzip,
    )


def _calls(llm: RecordedLLM, core: ServedCore, customer: str | None) -> list[ReadableSpan]:
    """A chat completion and a streamed one, instrumented, inside an app span naming
    `customer`; the spans, once exported."""
    provider = TracerProvider(resource=Resource.create({"service.name": "app"}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(core)))
    kept = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        client = openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1")
        named = {CUSTOMER: customer} if customer else {}
        with provider.get_tracer("app").start_as_current_span("request", attributes=named):
            client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=ASK,
                stream=True,
                stream_options={"include_usage": True},
            )
            for _ in stream:
                pass
        assert provider.force_flush(10_000)
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    return list(kept.get_finished_spans())


def _metadata(core: ServedCore, customer: str) -> list[dict[str, Any]]:
    return [e["metadata"] for e in stored(core, customer)]


def _without(metadata: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    kept = {k: v for k, v in metadata.items() if k not in fields}
    if "cachedInputTokens" in fields:
        kept["_llm"] = {k: v for k, v in kept["_llm"].items() if k != "cached_input_tokens"}
    return kept


def _by_strategy(core: ServedCore, llm: RecordedLLM, customer: str, stream: bool) -> None:
    """The same calls through `LLMStrategy`: a chat completion, and a streamed one."""
    with Ingestion(core.token, base_url=core.url) as ingestion:
        client = ingestion.strategy(LLMStrategy, "llm").wrap(
            openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1"), external_customer_id=customer
        )
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
        if stream:
            for _ in client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True):
                pass


def test_instrumented_calls_are_the_llm_strategys_events(tmp_path: Path, llm: RecordedLLM) -> None:
    with ServedCore(tmp_path / "core") as core:
        spans = _calls(llm, core, "otel-acme")
        wait_for("the two spans' events to be stored", lambda: len(stored(core, "otel-acme")) == 2)
        _by_strategy(core, llm, "strategy-acme", stream=True)
        from_spans = _metadata(core, "otel-acme")
        from_strategy = _metadata(core, "strategy-acme")
        assert [m["strategy"] for m in from_spans] == ["OTLP", "OTLP"]
        assert [m.get("cachedInputTokens") for m in from_spans] == [None, None]
        canonical = [json.dumps(_without(m, DIFFERENT), sort_keys=True) for m in from_spans]
        expected = [json.dumps(_without(m, DIFFERENT), sort_keys=True) for m in from_strategy]
        assert sorted(canonical) == sorted(expected)
        events = stored(core, "otel-acme")
        assert {e["name"] for e in events} == {"gen_ai.chat"}
        # The exporter's retry: the same spans again add nothing.
        assert _exporter(core).export(spans) == SpanExportResult.SUCCESS
        assert [e["id"] for e in stored(core, "otel-acme")] == [e["id"] for e in events]


def test_pydantic_ais_own_instrumentation_is_the_llm_strategys_events_too(
    tmp_path: Path, llm: RecordedLLM
) -> None:
    """Another family: Pydantic AI's spans report cached tokens too, so only the strategy's
    name differs; its agent span (aggregated usage) is not counted again."""
    provider = TracerProvider()
    kept = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    model = OpenAIChatModel("gpt-4o-mini", provider=OpenAIProvider(f"{llm.url}/v1", api_key="k"))
    agent = Agent(InstrumentedModel(model, InstrumentationSettings(tracer_provider=provider)))
    with provider.get_tracer("app").start_as_current_span("request", attributes={CUSTOMER: "pai"}):
        agent.run_sync("What is usage-based billing?")
    with ServedCore(tmp_path / "core") as core:
        assert _exporter(core).export(list(kept.get_finished_spans())) == SpanExportResult.SUCCESS
        _by_strategy(core, llm, "pai-strategy", stream=False)
        (metadata,) = _metadata(core, "pai")
        (expected,) = _metadata(core, "pai-strategy")
    assert (metadata["strategy"], metadata["cachedInputTokens"]) == ("OTLP", 512)
    assert _without(metadata, {"strategy"}) == _without(expected, {"strategy"})


def test_a_span_without_a_customer_is_refused_counted_and_the_rest_ignored(
    tmp_path: Path, llm: RecordedLLM
) -> None:
    with ServedCore(tmp_path / "core") as core, core.client() as api:
        _calls(llm, core, None)
        metrics = api.get("/metrics").text
        org = api.get("/v1/organizations/").json()["items"][0]["id"]
        assert (
            f'meterline_otlp_spans_total{{outcome="no_customer",organization_id="{org}"}} 2'
            in metrics
        )
        assert (
            f'meterline_otlp_spans_total{{outcome="ignored",organization_id="{org}"}} 1' in metrics
        )
        # The partial success, as OTLP/JSON answers it.
        usage = [{"key": "gen_ai.usage.output_tokens", "value": {"intValue": "3"}}]
        span = {"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "1", "attributes": usage}
        export = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
        answer = api.post("/v1/traces", json=export)
        assert answer.status_code == 200, answer.text
        partial = answer.json()["partialSuccess"]
        assert partial["rejectedSpans"] == "1" and "named no customer" in partial["errorMessage"]
        # One that a rule refuses is left out with its reason; the export is not refused.
        named = [{"key": CUSTOMER, "value": {"stringValue": "x" * 1000}}]
        span["attributes"] = usage + named
        partial = api.post("/v1/traces", json=export).json()["partialSuccess"]
        assert partial["rejectedSpans"] == "1" and "external_customer_id" in partial["errorMessage"]
        wrong = api.post("/v1/traces", content=b"{}", headers={"Content-Type": "text/plain"})
        assert wrong.status_code == 422 and "content-type" in wrong.text
        bomb = httpx.post(
            f"{core.url}/v1/traces",
            content=__import__("gzip").compress(b"\0" * (11 * 1024 * 1024)),
            headers={
                "Authorization": f"Bearer {core.token}",
                "Content-Type": "application/x-protobuf",
                "Content-Encoding": "gzip",
            },
        )
        assert bomb.status_code == 413


@pytest.mark.processes
def test_kafka_mode_stores_the_same(tmp_path: Path, llm: RecordedLLM) -> None:
    with (
        Broker() as broker,
        ServedCore(
            tmp_path / "core", "--kafka", broker.bootstrap, "--no-idempotence", "--partitions", "1"
        ) as core,
    ):
        _calls(llm, core, "kafka-acme")
        wait_for("the two spans' events to be stored", lambda: len(stored(core, "kafka-acme")) == 2)

        assert {m["strategy"] for m in _metadata(core, "kafka-acme")} == {"OTLP"}
        # Refused spans are the organization's dead letters, with why.
        _calls(llm, core, None)
        with core.client() as api:
            letters = api.get("/v1/dead-letters/").json()["items"]
        assert len(letters) == 2
        assert {letter["reason"][:35] for letter in letters} == {
            "otlp: GenAI spans named no customer"
        }
        assert {json.loads(letter["value"])["name"] for letter in letters} == {"gen_ai.chat"}


def test_a_price_table_costs_the_spans_and_a_wrong_one_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {"version": "v7", "models": {"gpt-4o-mini": {"input": "0.01", "output": "0.03"}}}
        )
    )
    tokens = [
        {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o-mini"}},
        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "100"}},
        {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "10"}},
        {"key": CUSTOMER, "value": {"stringValue": "priced"}},
    ]
    span = {"traceId": "0" * 31 + "7", "spanId": "0" * 15 + "7", "attributes": tokens}
    export = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    with ServedCore(tmp_path / "core", "--otlp-prices", str(prices)) as core, core.client() as api:
        assert api.post("/v1/traces", json=export).json() == {}
        (metadata,) = _metadata(core, "priced")
        assert metadata["_cost"] == {"amount": "1.3", "currency": "usd"}  # 100 × 0.01 + 10 × 0.03
        assert metadata["priceTable"] == "v7"
    prices.write_text(json.dumps({"version": "v8", "models": {"m": {"input": "0.01"}}}))
    assert (
        cli.main(["up", "--data-dir", str(tmp_path / "other"), "--otlp-prices", str(prices)]) == 2
    )
    assert "--otlp-prices" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
