"""`GET`/`PUT /v1/otlp/settings`: an organization's customer attributes and price table for
`POST /v1/traces`, over the server's own; another organization keeps the server's; the edge
takes them from the control topic's records (`TokenView`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.intake.sealed import Sealer
from aggregator.intake.token_records import TokenView
from ingest.http import OtlpSettings, PerOrganization
from ingest.kafka import KafkaSettings
from meters.commands import command
from meters.settings import Customers
from tests.inprocess import InProcessCore

PRICES = {"version": "acme-1", "models": {"gpt-4o-mini": {"input": "0.01", "output": "0.03"}}}


@pytest.fixture
def core(tmp_path: Path) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path / "core") as running:
        yield running


def _export(span_id: str, **attributes: Any) -> dict[str, Any]:
    values = {"gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 100}
    values |= {"gen_ai.usage.output_tokens": 10, **attributes}
    attrs = [
        {"key": k, "value": {"intValue": str(v)} if type(v) is int else {"stringValue": v}}
        for k, v in values.items()
    ]
    span = {"traceId": "ab" * 16, "spanId": span_id, "attributes": attrs}
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}


def _stored(core: InProcessCore, customer: str, token: str | None = None) -> list[dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    found = core.request(
        "GET", "/v1/events/", params={"external_customer_id": customer}, headers=headers
    )
    return [e["metadata"] for e in found.json()["items"]]


def test_an_organizations_settings_apply_to_its_spans_alone(core: InProcessCore) -> None:
    unset = core.request("GET", "/v1/otlp/settings").json()
    assert unset == {"customer_attributes": [], "prices": None, "modified_at": None}
    body = {"customer_attributes": ["enduser.id"], "prices": PRICES}
    put = core.request("PUT", "/v1/otlp/settings", json=body)
    assert put.status_code == 200, put.text
    assert put.json()["customer_attributes"] == ["enduser.id"] and put.json()["modified_at"]
    assert core.request("GET", "/v1/otlp/settings").json() == put.json()
    answer = core.request("POST", "/v1/traces", json=_export("01" * 8, **{"enduser.id": "u1"}))
    assert answer.json() == {}, answer.text
    (metadata,) = _stored(core, "u1")
    assert metadata["_cost"] == {"amount": "1.3", "currency": "usd"}
    assert metadata["priceTable"] == "acme-1"
    # Another organization keeps the server's: no enduser.id, no prices.
    other = core.registry.create_token(core.registry.organization("other"), "tests")
    headers = {"Authorization": f"Bearer {other}"}
    refused = core.request(
        "POST", "/v1/traces", json=_export("02" * 8, **{"enduser.id": "u2"}), headers=headers
    )
    assert refused.json()["partialSuccess"]["rejectedSpans"] == "1"
    named = _export("03" * 8, **{"meterline.customer.external_id": "u3"})
    assert core.request("POST", "/v1/traces", json=named, headers=headers).json() == {}
    (plain,) = _stored(core, "u3", other)
    assert "_cost" not in plain
    # A PUT is the whole: what it leaves out is unset.
    core.request("PUT", "/v1/otlp/settings", json={"customer_attributes": ["x"]})
    assert core.request("GET", "/v1/otlp/settings").json()["prices"] is None
    # Nothing set is no settings: as if the organization never had any.
    core.request("PUT", "/v1/otlp/settings", json={})
    assert core.request("GET", "/v1/otlp/settings").json() == unset


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"customer_attributes": ["a"] * 11}, ["body", "customer_attributes"]),
        ({"customer_attributes": [""]}, ["body", "customer_attributes", 0]),
        ({"prices": {"version": "1", "models": {"m": {"input": "1e-13", "output": "1"}}}}, None),
        ({"prices": {"models": {}}}, ["body", "prices"]),
        ({"colour": "red"}, ["body", "colour"]),
    ],
)
def test_bad_settings_are_a_422_naming_the_field(
    core: InProcessCore, body: dict[str, Any], loc: list[Any] | None
) -> None:
    answer = core.request("PUT", "/v1/otlp/settings", json=body)
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["detail"]
    assert error["loc"] == (loc or ["body", "prices"])
    assert core.request("GET", "/v1/otlp/settings").json()["modified_at"] is None


def test_the_edge_takes_them_from_the_control_topic(tmp_path: Path) -> None:
    view = TokenView(KafkaSettings("unused:9092"), Sealer(b"k" * 32), b"k" * 32)
    deployment = OtlpSettings(Customers())
    settings = PerOrganization(deployment, view.otlp_settings)
    org = "3f1c2a9e-0d5b-4e7a-9c61-2b8f4d7e6a10"
    assert asyncio.run(settings(org)) is deployment
    data = {"customer_attributes": ["enduser.id"], "prices": PRICES}
    view.add(command("otlp.settings", org, "r1", 1_000, {}, data=data))
    found = asyncio.run(settings(org))
    assert found.customers.of({"enduser.id": "u1"}) == ("external_customer_id", "u1")
    assert found.prices is not None and found.prices.version == "acme-1"
    assert asyncio.run(settings(org)) is found  # parsed once per change
    view.add(command("otlp.settings", org, "r2", 2_000, {}, data={"customer_attributes": []}))
    assert asyncio.run(settings(org)) is deployment
