"""`GET`/`PUT /v1/pricing/settings`: an organization's `_llm` events without `_cost` priced
from the catalogue (with a markup) or its own prices, as ingested; the OTLP path priced the
same way; other organizations untouched; bad settings a 422 naming the field; the edge takes
them from the control topic's records (`TokenView`)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from aggregator.intake.sealed import Sealer
from aggregator.intake.token_records import TokenView
from ingest.kafka import KafkaSettings
from meters.catalog import installed_version
from meters.commands import command
from tests.inprocess import InProcessCore

AT = "2026-11-02T10:00:00Z"


@pytest.fixture
def core(tmp_path: Path) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path / "core") as running:
        yield running


def _llm(vendor: str, model: str, inputs: int, outputs: int, cached: int | None = None) -> Any:
    llm: dict[str, Any] = {"vendor": vendor, "model": model, "input_tokens": inputs}
    llm |= {"output_tokens": outputs, "total_tokens": inputs + outputs}
    if cached is not None:
        llm["cached_input_tokens"] = cached
    return llm


def _event(external_id: str, customer: str, **metadata: Any) -> dict[str, Any]:
    return {
        "name": "llm.call",
        "external_id": external_id,
        "external_customer_id": customer,
        "timestamp": AT,
        "metadata": {"call": external_id, **metadata},
    }


def _ingest(core: InProcessCore, events: list[dict[str, Any]], token: str | None = None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    answer = core.request("POST", "/v1/events/ingest", json={"events": events}, headers=headers)
    assert answer.status_code == 200, answer.text


def _stored(core: InProcessCore, customer: str, token: str | None = None) -> dict[str, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    found = core.request(
        "GET", "/v1/events/", params={"external_customer_id": customer}, headers=headers
    )
    return {e["metadata"].get("call", ""): e["metadata"] for e in found.json()["items"]}


def _catalogue(model: str, vendor: str, inputs: int, outputs: int, cached: int, markup: str) -> str:
    usage = Usage(input_tokens=inputs, output_tokens=outputs, cache_read_tokens=cached)
    at = datetime.fromisoformat(AT)
    dollars = calc_price(usage, model, provider_id=vendor, genai_request_timestamp=at).total_price
    cents = (dollars * 100 * (100 + Decimal(markup)) / 100).quantize(Decimal("1e-12"))
    return format(cents.quantize(Decimal("1e-12"), ROUND_HALF_EVEN).normalize(), "f")


def test_the_catalogue_and_overrides_price_an_organizations_llm_events(core: InProcessCore) -> None:
    unset = core.request("GET", "/v1/pricing/settings").json()
    assert unset["catalog"] is False and unset["modified_at"] is None
    assert unset["catalog_version"] == installed_version()
    _ingest(core, [_event("before", "c1", _llm=_llm("openai", "gpt-4o", 1000, 100))])
    settings = {
        "catalog": True,
        "markup_percent": 10,
        "overrides": {"acme/house-model": {"input": "0.0001", "output": "0.0003"}},
    }
    put = core.request("PUT", "/v1/pricing/settings", json=settings)
    assert put.status_code == 200, put.text
    assert put.json()["markup_percent"] == 10 and put.json()["modified_at"]
    assert put.json()["overrides"] == {"acme/house-model": {"input": "0.0001", "output": "0.0003"}}
    assert core.request("GET", "/v1/pricing/settings").json() == put.json()
    given = {"amount": "5", "currency": "usd"}
    _ingest(
        core,
        [
            _event("cached", "c1", _llm=_llm("anthropic", "claude-sonnet-4-5", 20_000, 700, 5_000)),
            _event("house", "c1", _llm=_llm("acme", "house-model", 1_000, 10)),
            _event("given", "c1", _cost=given, _llm=_llm("openai", "gpt-4o", 1, 1)),
            _event("unknown", "c1", _llm=_llm("nobody", "mystery-1", 10, 10)),
            _event("plain", "c1", route="/x"),
        ],
    )
    stored = _stored(core, "c1")
    assert "_cost" not in stored["before"]  # priced as ingested: what came before stays
    cost = _catalogue("claude-sonnet-4-5", "anthropic", 20_000, 700, 5_000, "10")
    assert stored["cached"]["_cost"] == {"amount": cost, "currency": "usd"}
    assert stored["cached"]["priceTable"] == installed_version()
    # Overrides: 1,000 x 0.0001 + 10 x 0.0003 = 0.103 cents, and the markup: 0.1133.
    assert stored["house"]["_cost"]["amount"] == "0.1133"
    assert stored["house"]["priceTable"] == "overrides"
    assert stored["given"]["_cost"] == given and "priceTable" not in stored["given"]
    assert "_cost" not in stored["unknown"] and "_cost" not in stored["plain"]
    listed = core.request("GET", "/v1/pricing/settings").json()["unpriced_models"]
    assert listed == [{"model": "nobody/mystery-1", "events": 1}]
    metrics = core.request("GET", "/metrics").text
    org = core.registry.organization("default").id
    assert f'meterline_pricing_unpriced_events_total{{organization_id="{org}"}} 1' in metrics
    # Another organization prices nothing.
    other = core.registry.create_token(core.registry.organization("other"), "tests")
    _ingest(core, [_event("theirs", "c2", _llm=_llm("openai", "gpt-4o", 10, 10))], other)
    assert "_cost" not in _stored(core, "c2", other)["theirs"]
    # A PUT is the whole: without the catalogue, only the overrides price.
    core.request("PUT", "/v1/pricing/settings", json={"overrides": settings["overrides"]})
    _ingest(
        core,
        [
            _event("after", "c1", _llm=_llm("openai", "gpt-4o", 10, 10)),
            _event("house2", "c1", _llm=_llm("acme", "house-model", 10_000, 0)),
        ],
    )
    stored = _stored(core, "c1")
    assert "_cost" not in stored["after"]
    assert stored["house2"]["_cost"]["amount"] == "1"


def test_otlp_spans_without_a_table_price_from_the_catalogue(core: InProcessCore) -> None:
    core.request("PUT", "/v1/pricing/settings", json={"catalog": True})
    attributes = {
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 1_000,
        "gen_ai.usage.output_tokens": 50,
        "meterline.customer.external_id": "u1",
    }
    attrs = [
        {"key": k, "value": {"intValue": str(v)} if type(v) is int else {"stringValue": v}}
        for k, v in attributes.items()
    ]
    span = {"traceId": "ab" * 16, "spanId": "01" * 8, "attributes": attrs}
    export = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    assert core.request("POST", "/v1/traces", json=export).json() == {}
    (metadata,) = _stored(core, "u1").values()
    vendor = metadata["_llm"]["vendor"]
    assert metadata["priceTable"] == installed_version(), metadata
    usage = Usage(input_tokens=1_000, output_tokens=50)
    expected = calc_price(usage, "gpt-4o-mini", provider_id=vendor).total_price * 100
    assert Decimal(metadata["_cost"]["amount"]) == expected


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"markup_percent": -1}, ["body", "markup_percent"]),
        ({"markup_percent": 1001}, ["body", "markup_percent"]),
        ({"markup_percent": "1.005"}, ["body", "markup_percent"]),
        ({"catalog": "yes please"}, ["body", "catalog"]),
        ({"overrides": {"no-slash": {"input": 1, "output": 1}}}, ["body", "overrides"]),
        ({"overrides": {"a/b": {"input": 1}}}, ["body", "overrides", "a/b", "output"]),
        ({"overrides": {"a/b": {"input": "1e-13", "output": 1}}}, None),
        ({"overrides": {"a/b": {"input": 1, "output": 1, "extra": 1}}}, None),
        ({"colour": "red"}, ["body", "colour"]),
    ],
)
def test_bad_settings_are_a_422_naming_the_field(
    core: InProcessCore, body: dict[str, Any], loc: list[Any] | None
) -> None:
    answer = core.request("PUT", "/v1/pricing/settings", json=body)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    if loc is not None:
        assert [e["loc"] for e in errors] == [loc], errors
    else:
        assert errors[0]["loc"][:3] == ["body", "overrides", "a/b"], errors
    assert core.request("GET", "/v1/pricing/settings").json()["modified_at"] is None


def test_the_edge_takes_an_organizations_pricing_from_the_control_topic() -> None:
    view = TokenView(KafkaSettings("unused:9092"), Sealer(b"s" * 32), b"s" * 32)
    org = "0b9c3d0e-7f6a-4a43-9d0f-3a5a3f0b3c11"
    assert view.pricing_of(org) is None
    view.add(command("pricing.settings", org, "r1", 1_000, {}, data={"catalog": True}))
    pricing = view.pricing_of(org)
    assert pricing is not None and pricing.catalog
    view.add(command("pricing.settings", org, "r2", 2_000, {}, data={"catalog": False}))
    assert view.pricing_of(org) is None
