"""Customer meters and customer state through the official polar-sdk client, and meterline's
credits, resets, plans and balance check over HTTP."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from polar.v2026_10 import Polar

from meters.ledger_rules import cycle_start
from tests.processes import Server, new_org_token


@pytest.fixture
def token(server: Server) -> str:
    return new_org_token(server.data_dir, f"ledger-{uuid.uuid4().hex}")


@pytest.fixture
def http(server: Server, token: str) -> httpx.Client:
    return server.client(token)


def _setup(polar: Polar) -> tuple[str, str]:
    customer = polar.customers.create(email="ada@example.com", external_id="ada")
    meter = polar.meters.create(
        name="tokens",
        filter={"conjunction": "and", "clauses": []},
        aggregation={"func": "sum", "property": "tokens"},
    )
    return customer.id, meter.id


def _use(http: httpx.Client, tokens: int, **customer: str) -> None:
    event = {"name": "use", "metadata": {"tokens": tokens}, **customer}
    response = http.post("/v1/events/ingest", json={"events": [event]})
    assert response.status_code == 200, response.text


def _post(http: httpx.Client, path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    result: dict[str, Any] = response.json()
    return result


def test_polar_docs_example_through_the_sdk(server: Server, token: str, http: httpx.Client) -> None:
    polar = Polar(token, base_url=server.url)
    customer_id, meter_id = _setup(polar)
    grant = {"customer_id": customer_id, "meter_id": meter_id, "units": 10, "external_id": "g1"}
    assert _post(http, "/v1/meter-credits/", grant, 201)["customer_meter"]["balance"] == 10
    _use(http, 3, external_customer_id="ada")
    (cm,) = polar.customer_meters.list(customer_id=customer_id).items
    assert (cm.consumed_units, cm.credited_units, cm.balance) == (3, 10, 7)
    assert cm.customer.id == customer_id and cm.meter.id == meter_id
    _use(http, 8, customer_id=customer_id)  # either id of the customer counts
    got = polar.customer_meters.get(cm.id)
    assert (got.consumed_units, got.credited_units, got.balance) == (11, 10, -1)
    state = polar.customers.get_state(customer_id)
    assert [(m.meter_id, m.balance) for m in state.active_meters] == [(meter_id, -1)]
    external = polar.customers.get_state_external("ada")
    assert external.id == customer_id and external.active_meters[0].consumed_units == 11
    # Replaying the grant changes nothing and answers what the grant answered.
    replay = _post(http, "/v1/meter-credits/", grant, 200)
    assert replay["replayed"] is True and replay["customer_meter"]["balance"] == 10
    # The same key for another request is refused, naming the key.
    refused = http.post("/v1/meter-credits/", json={**grant, "units": 11})
    assert refused.status_code == 409 and "'g1'" in refused.json()["detail"], refused.text
    assert polar.customer_meters.get(cm.id).balance == -1


def test_reset_carries_over_rollover_credits_and_check_answers(
    server: Server, token: str, http: httpx.Client
) -> None:
    customer_id, meter_id = _setup(Polar(token, base_url=server.url))
    who = {"external_customer_id": "ada", "meter_id": meter_id}
    _post(http, "/v1/meter-credits/", {**who, "units": 100, "external_id": "base"}, 201)
    _post(
        http,
        "/v1/meter-credits/",
        {**who, "units": 30, "rollover": True, "external_id": "extra"},
        201,
    )
    _use(http, 110, external_customer_id="ada")  # 20 left, of which 20 may roll over
    after = _post(http, "/v1/meter-resets/", {**who, "external_id": "cycle-1"}, 201)
    cm = after["customer_meter"]
    assert (cm["consumed_units"], cm["credited_units"], cm["balance"]) == (0, 20, 20)
    check = http.get(
        "/v1/customer-meters/check",
        params={"customer_id": customer_id, "meter_id": meter_id, "units": 25},
    ).json()
    assert check == {
        "allowed": False,
        "units": 25,
        "balance": 20,
        "balance_after": -5,
        "consumed_units": 0,
        "credited_units": 20,
        "held_units": 0,
    }
    events = http.get("/v1/events/", params={"customer_id": customer_id, "limit": 100}).json()
    names = sorted(e["name"] for e in events["items"] if e["source"] == "system")
    assert names == ["meter.credited", "meter.credited", "meter.credited", "meter.reset"]


def test_plans_grant_at_each_boundary_and_bad_input_names_the_field(
    server: Server, token: str, http: httpx.Client
) -> None:
    customer_id, meter_id = _setup(Polar(token, base_url=server.url))
    # A month ago, less an hour: its first boundary is due at once, the next in an hour.
    starts_at = cycle_start(datetime.now(UTC), "month", -1) + timedelta(hours=1)
    plan = {
        "customer_id": customer_id,
        "meter_id": meter_id,
        "units": 50,
        "interval": "month",
        "starts_at": starts_at.isoformat(),
        "external_id": "plan-1",
    }
    # More than one interval back would grant (and reset) every cycle since in one go.
    for long_ago in ("0001-01-01T00:00:00Z", (starts_at - timedelta(hours=2)).isoformat()):
        refused = http.post("/v1/credit-plans/", json={**plan, "starts_at": long_ago})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "starts_at"]
    created = _post(http, "/v1/credit-plans/", plan, 201)
    assert created["cycles"] == 1
    assert _post(http, "/v1/credit-plans/", plan, 200)["id"] == created["id"]  # idempotent
    listed = http.get("/v1/credit-plans/", params={"customer_id": customer_id}).json()
    assert [p["id"] for p in listed["items"]] == [created["id"]]
    (cm,) = http.get("/v1/customer-meters/", params={"meter_id": meter_id}).json()["items"]
    assert cm["credited_units"] == 50  # each cycle resets, then grants the period's units
    assert http.delete(f"/v1/credit-plans/{created['id']}").status_code == 204
    assert http.get(f"/v1/credit-plans/{created['id']}").status_code == 404
    bad = http.post("/v1/meter-credits/", json={**plan, "units": 0}).json()
    assert {tuple(d["loc"]) for d in bad["detail"]} >= {("body", "interval")}
    unknown = http.post(
        "/v1/meter-credits/",
        json={
            "external_customer_id": "nobody",
            "meter_id": meter_id,
            "units": 1,
            "external_id": "x",
        },
    )
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "external_customer_id"]
