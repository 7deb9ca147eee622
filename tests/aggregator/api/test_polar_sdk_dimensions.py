"""A meter's `dimensions` (meterline's own, issue 64) in every meter answer leave polar-sdk, in
both API versions it ships that meterline takes (2026-04 and 2026-10), loading meters as it
does: meters with and without dimensions, made over HTTP, are listed, read, updated (their
dimensions kept) and embedded in customer meters, and each answer loads."""

from __future__ import annotations

import uuid
from types import ModuleType
from typing import Any

import pytest
from polar import v2026_04, v2026_10

from tests.processes import Server, new_org_token

pytestmark = pytest.mark.slow  # polar-sdk builds its loaders once per version: about 1.5 s each

FILTER = {
    "conjunction": "and",
    "clauses": [{"property": "name", "operator": "eq", "value": "call"}],
}
METERS: dict[str, dict[str, Any]] = {
    "calls": {"aggregation": {"func": "count"}},
    "calls by model": {"aggregation": {"func": "count"}, "dimensions": ["_llm.model"]},
    "tokens by model and region": {
        "aggregation": {"func": "sum", "property": "tokens"},
        "dimensions": ["_llm.model", "metadata.region", "tier"],
    },
}


@pytest.mark.parametrize("version", [v2026_04, v2026_10], ids=["2026-04", "2026-10"])
def test_polar_sdk_loads_meters_with_and_without_dimensions(
    server: Server, version: ModuleType
) -> None:
    token = new_org_token(server.data_dir, f"dimensions-{uuid.uuid4().hex}")
    polar = version.Polar(token, base_url=server.url)
    with server.client(token) as http:
        made = {}
        for name, definition in METERS.items():
            answer = http.post("/v1/meters/", json={"name": name, "filter": FILTER, **definition})
            assert answer.status_code == 201, answer.text
            made[name] = answer.json()
        # Read back in Polar's spelling (`metadata.region` is the metadata key `region`).
        assert [m["dimensions"] for m in made.values()] == [
            [],
            ["_llm.model"],
            ["_llm.model", "region", "tier"],
        ]
        ids = {name: m["id"] for name, m in made.items()}

        listed = polar.meters.list()
        assert isinstance(listed.items[0], version.outputs.Meter)
        assert sorted(m.name for m in listed.items) == sorted(METERS)
        for name, meter_id in ids.items():
            meter = polar.meters.get(meter_id)
            assert isinstance(meter, version.outputs.Meter)
            assert meter.name == name

        # An update through polar-sdk (which knows no dimensions) keeps them.
        renamed = polar.meters.update(ids["calls by model"], name="calls per model")
        assert renamed.name == "calls per model"
        kept = http.get(f"/v1/meters/{ids['calls by model']}").json()
        assert kept["dimensions"] == ["_llm.model"]

        # Customer meters embed the meter, dimensions and all.
        customer = polar.customers.create(email=f"{uuid.uuid4().hex}@example.com")
        credited = http.post(
            "/v1/meter-credits/",
            json={
                "customer_id": customer.id,
                "meter_id": ids["tokens by model and region"],
                "units": 10,
                "external_id": "g",
            },
        )
        assert credited.status_code == 201, credited.text
        assert credited.json()["customer_meter"]["meter"]["dimensions"] == [
            "_llm.model",
            "region",
            "tier",
        ]
        (customer_meter,) = polar.customer_meters.list(customer_id=customer.id).items
        assert isinstance(customer_meter.meter, version.outputs.Meter)
        assert customer_meter.meter.id == ids["tokens by model and region"]
        assert polar.customer_meters.get(customer_meter.id).meter.name == (
            "tokens by model and region"
        )
