"""OTLP trace exports read as `opentelemetry-proto` writes them (protobuf) and as OTLP/JSON
writes them, and GenAI spans as usage events (`meters.events.genai`)."""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ProtoResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from meters.errors import ValidationFailed
from meters.events.genai import event, usage_events
from meters.events.otlp import (
    Resource,
    Span,
    Wanted,
    from_json,
    from_protobuf,
    partial_success_protobuf,
)
from meters.settings import Customers, Prices

WANTED = {"gen_ai.usage.input_tokens", "gen_ai.request.model", "flag", "ratio", "who"}
values = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
attributes = st.dictionaries(
    st.sampled_from(sorted(WANTED | {"http.route", "db.statement"})), values, max_size=5
)
spans = st.builds(
    Span,
    trace_id=st.binary(min_size=16, max_size=16).map(bytes.hex),
    span_id=st.binary(min_size=8, max_size=8).map(bytes.hex),
    parent_span_id=st.one_of(st.just(""), st.binary(min_size=8, max_size=8).map(bytes.hex)),
    end_unix_nano=st.integers(min_value=0, max_value=2**64 - 1),
    attributes=attributes,
)
resources = st.lists(
    st.builds(Resource, attributes=attributes, spans=st.lists(spans, max_size=4)), max_size=3
)


def _value(value: Any) -> AnyValue:
    if type(value) is bool:
        return AnyValue(bool_value=value)
    if type(value) is int:
        return AnyValue(int_value=value)
    if type(value) is float:
        return AnyValue(double_value=value)
    return AnyValue(string_value=value)


def _protobuf(found: list[Resource]) -> bytes:
    def attrs(a: dict[str, Any]) -> list[KeyValue]:
        return [KeyValue(key=k, value=_value(v)) for k, v in a.items()]

    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=ProtoResource(attributes=attrs(r.attributes)),
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            ProtoSpan(
                                trace_id=bytes.fromhex(s.trace_id),
                                span_id=bytes.fromhex(s.span_id),
                                parent_span_id=bytes.fromhex(s.parent_span_id),
                                name="op",
                                start_time_unix_nano=1,
                                end_time_unix_nano=s.end_unix_nano,
                                attributes=attrs(s.attributes),
                            )
                            for s in r.spans
                        ]
                    )
                ],
            )
            for r in found
        ]
    )
    return request.SerializeToString()


def _json_value(value: Any) -> dict[str, Any]:
    if type(value) is bool:
        return {"boolValue": value}
    if type(value) is int:
        return {"intValue": str(value)}  # OTLP/JSON writes int64 as strings
    if type(value) is float:
        return {"doubleValue": value}
    return {"stringValue": value}


def _json(found: list[Resource]) -> dict[str, Any]:
    def attrs(a: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"key": k, "value": _json_value(v)} for k, v in a.items()]

    return {
        "resourceSpans": [
            {
                "resource": {"attributes": attrs(r.attributes)},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": s.trace_id,
                                "spanId": s.span_id,
                                "parentSpanId": s.parent_span_id,
                                "endTimeUnixNano": str(s.end_unix_nano),
                                "attributes": attrs(s.attributes),
                            }
                            for s in r.spans
                        ]
                    }
                ],
            }
            for r in found
        ]
    }


def _only_wanted(found: list[Resource]) -> list[Resource]:
    """What the decoders give: the wanted attributes, and the end of spans that have one."""

    def kept(a: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in a.items() if k in WANTED}

    def span(s: Span) -> Span:
        attributes = kept(s.attributes)
        end = s.end_unix_nano if attributes else 0
        return Span(s.trace_id, s.span_id, s.parent_span_id, end, attributes)

    return [Resource(kept(r.attributes), [span(s) for s in r.spans]) for r in found]


@given(resources)
def test_protobuf_and_json_read_alike_what_opentelemetry_writes(found: list[Resource]) -> None:
    expected = _only_wanted(found)
    assert from_protobuf(_protobuf(found), Wanted(names=frozenset(WANTED))) == expected
    assert from_json(_json(found), Wanted(names=frozenset(WANTED))) == expected


@given(st.integers(min_value=0, max_value=2**62), st.text(max_size=50))
def test_the_partial_success_is_what_opentelemetry_reads(rejected: int, message: str) -> None:
    answer = ExportTraceServiceResponse.FromString(partial_success_protobuf(rejected, message))
    assert answer.partial_success.rejected_spans == rejected
    assert answer.partial_success.error_message == message


WHO = {"attributes": [{"key": "who", "value": {"stringValue": "a"}}]}


def test_a_malformed_body_is_a_422_not_a_crash() -> None:
    # Cut short, a varint never ended, a wire type of no use, a message where bytes go.
    for raw in (b"\xff", b"\x0a\x05ab", b"\x0b", base64.b64decode("CgQKAggB")):
        with pytest.raises(ValidationFailed):
            from_protobuf(raw, Wanted(names=frozenset(WANTED)))
    with pytest.raises(ValidationFailed):
        from_json(
            {"resourceSpans": [{"scopeSpans": [{"spans": [{"endTimeUnixNano": "x", **WHO}]}]}]},
            Wanted(names=frozenset(WANTED)),
        )


TRACE = "ab" * 16


def _span(span_id: str, parent: str = "", **attributes: Any) -> Span:
    return Span(TRACE, span_id, parent, 1_764_000_000_123_456_789, attributes)


USAGE = {
    "gen_ai.provider.name": "openai",
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": "gpt-4o-mini",
    "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
    "gen_ai.usage.input_tokens": 812,
    "gen_ai.usage.output_tokens": 194,
}


def test_a_usage_span_is_the_llm_strategys_event() -> None:
    made = event(_span("01" * 8, **USAGE), ("external_customer_id", "acme"), None)
    assert made == {
        "name": "gen_ai.chat",
        "external_id": f"otel:{TRACE}:{'01' * 8}",
        "external_customer_id": "acme",
        "timestamp": "2025-11-24T16:00:00.123456Z",
        "metadata": {
            "vendor": "openai.chat",
            "model": "gpt-4o-mini",
            "inputTokens": 812,
            "outputTokens": 194,
            "totalTokens": 1006,
            "strategy": "OTLP",
            "responseModel": "gpt-4o-mini-2024-07-18",
            "_llm": {
                "vendor": "openai.chat",
                "model": "gpt-4o-mini",
                "input_tokens": 812,
                "output_tokens": 194,
                "total_tokens": 1006,
            },
        },
    }
    # Older spellings and Anthropic's cache attributes; the vendor as LLMStrategy names it.
    older = {
        "gen_ai.system": "anthropic",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "claude-haiku-4-5",
        "gen_ai.usage.prompt_tokens": 27,
        "gen_ai.usage.completion_tokens": 41,
        "gen_ai.usage.cache_read.input_tokens": 3072,
        "gen_ai.usage.cache_creation.input_tokens": 1200,
    }
    metadata = event(_span("02" * 8, **older), ("customer_id", "x"), None)["metadata"]
    assert metadata["_llm"] == {
        "vendor": "anthropic.messages",
        "model": "claude-haiku-4-5",
        "input_tokens": 27,
        "cached_input_tokens": 3072,
        "output_tokens": 41,
        "total_tokens": 68,
    }
    assert (metadata["cachedInputTokens"], metadata["cacheCreationInputTokens"]) == (3072, 1200)


def test_the_customer_is_the_spans_else_the_nearest_ancestors_else_the_resources() -> None:
    who = {"meterline.customer.external_id": "near"}
    chain = [
        _span("01" * 8, **{"meterline.customer.id": "far"}),
        _span("02" * 8, "01" * 8, **who),
        _span("03" * 8, "02" * 8, **USAGE),  # the nearest ancestor's
        _span("04" * 8, "03" * 8, **USAGE),  # a usage span's child: its parent event too
        _span("05" * 8, "01" * 8, **USAGE, **{"enduser.id": "own"}),
    ]
    lone = _span("06" * 8, "ff" * 8, **USAGE)  # its parent is not in the request
    customers = Customers(
        {
            "meterline.customer.external_id": "external_customer_id",
            "enduser.id": "external_customer_id",
            "meterline.customer.id": "customer_id",
        }
    )
    found = usage_events(
        [Resource({}, chain), Resource({"meterline.customer.external_id": "res"}, [lone])],
        customers,
    )
    by_span = {e["external_id"].rsplit(":", 1)[1]: e for e in found.events}
    assert by_span["03" * 8]["external_customer_id"] == "near"
    assert by_span["04" * 8]["external_customer_id"] == "near"
    assert by_span["04" * 8]["parent_id"] == f"otel:{TRACE}:{'03' * 8}"
    assert "parent_id" not in by_span["03" * 8]  # its parent reports no usage
    assert by_span["05" * 8]["external_customer_id"] == "own"
    assert by_span["06" * 8]["external_customer_id"] == "res"
    assert (found.spans, found.no_customer) == (6, 0)
    # Without any customer attribute: counted, not an event.
    nobody = usage_events([Resource({}, [_span("07" * 8, **USAGE)])], Customers())
    assert (nobody.events, nobody.no_customer) == ([], 1)


PRICES = {
    "version": "2026-11",
    "models": {
        "gpt-4o-mini": {"input": "0.000015", "output": "0.00006", "cached_input": "0.0000075"},
        "claude-haiku-4-5": {
            "input": "0.0001",
            "output": "0.0005",
            "cached_input": "0.00001",
            "cache_creation": "0.000125",
        },
    },
}


def test_a_price_table_gives_the_event_an_exact_cost_and_its_version() -> None:
    prices = Prices.parse(PRICES)
    cached = {**USAGE, "gen_ai.usage.cache_read.input_tokens": 512}
    metadata = event(_span("01" * 8, **cached), ("customer_id", "x"), None, prices)["metadata"]
    # 300 plain input tokens, 512 read from the cache, 194 output, in cents.
    expected = (
        Decimal(300) * Decimal("0.000015") + 512 * Decimal("0.0000075") + 194 * Decimal("0.00006")
    )
    assert metadata["_cost"] == {"amount": str(expected), "currency": "usd"}
    assert Decimal(metadata["_cost"]["amount"]) == Decimal("0.019980")
    assert metadata["priceTable"] == "2026-11"
    # Cache writes at their own price; a model the table does not list has no cost.
    anthropic = {
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-haiku-4-5",
        "gen_ai.usage.input_tokens": 4299,
        "gen_ai.usage.output_tokens": 41,
        "gen_ai.usage.cache_read.input_tokens": 3072,
        "gen_ai.usage.cache_creation.input_tokens": 1200,
    }
    cost = event(_span("02" * 8, **anthropic), ("customer_id", "x"), None, prices)["metadata"]
    assert Decimal(cost["_cost"]["amount"]) == (
        27 * Decimal("0.0001")
        + 3072 * Decimal("0.00001")
        + 1200 * Decimal("0.000125")
        + 41 * Decimal("0.0005")
    )
    other = {**USAGE, "gen_ai.request.model": "gpt-5"}
    assert (
        "_cost"
        not in event(_span("03" * 8, **other), ("customer_id", "x"), None, prices)["metadata"]
    )


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"models": {}}, "version"),
        ({"version": "1", "models": {"m": {"input": "1"}}}, "models.m: needs input and output"),
        ({"version": "1", "models": {"m": {"input": "x", "output": "1"}}}, "models.m.input"),
        ({"version": "1", "models": {"m": {"input": "1e-13", "output": "1"}}}, "12 decimal"),
        ({"version": "1", "models": {"m": {"input": "-1", "output": "1"}}}, ">= 0"),
    ],
)
def test_a_wrong_price_table_is_refused_naming_the_field(table: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Prices.parse(table)
