"""Top-up rules over HTTP (in process): made, listed (filtered by meter and customer), read,
changed and deleted; a customer meter falling below a rule's threshold is topped up at the
event that took it there, at most the rule's cap per period, each top-up listed and sent as
one `customer_meter.topped_up` webhook event whose data names it; bad input is a 4xx naming
the field, and a rule that would loop a 422 naming `units`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.inprocess import InProcessCore

EVERYTHING = {"conjunction": "and", "clauses": []}


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("top-ups"), private_webhooks=True) as running:
        yield running


def _made(core: InProcessCore, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = core.request("POST", path, json=body)
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    return found


@pytest.fixture(scope="module")
def seeded(core: InProcessCore) -> dict[str, str]:
    calls = {"name": "calls", "filter": EVERYTHING, "aggregation": {"func": "count"}}
    tokens = {
        "name": "tokens",
        "filter": EVERYTHING,
        "aggregation": {"func": "sum", "property": "tokens"},
    }
    latest = {
        "name": "level",
        "filter": EVERYTHING,
        "aggregation": {"func": "max", "property": "n"},
    }
    # A meter split by a dimension: its organization's evaluated events carry the dimension's
    # values beside each meter's contributions.
    by_model = {**tokens, "name": "tokens by model", "dimensions": ["model"]}
    ids = {
        "calls": _made(core, "/v1/meters/", calls)["id"],
        "tokens": _made(core, "/v1/meters/", tokens)["id"],
        "level": _made(core, "/v1/meters/", latest)["id"],
        "by_model": _made(core, "/v1/meters/", by_model)["id"],
        "ada": _made(core, "/v1/customers/", {"email": "ada@example.com", "external_id": "ada"})[
            "id"
        ],
        "bob": _made(core, "/v1/customers/", {"email": "bob@example.com", "external_id": "bob"})[
            "id"
        ],
    }
    hook = {
        "url": "http://127.0.0.1:9/hook",
        "format": "raw",
        "events": ["customer_meter.topped_up"],
    }
    _made(core, "/v1/webhooks/endpoints", hook)
    core.settle()
    return ids


def _ingest(core: InProcessCore, customer: str, count: int, **metadata: Any) -> None:
    events = [
        {"name": "call", "external_customer_id": customer, "metadata": metadata}
        for _ in range(count)
    ]
    response = core.request("POST", "/v1/events/ingest", json={"events": events})
    assert response.status_code == 200, response.text


def _balance(core: InProcessCore, customer_id: str, meter_id: str) -> float:
    found = core.request(
        "GET", "/v1/customer-meters/", params={"customer_id": customer_id, "meter_id": meter_id}
    ).json()["items"]
    return float(found[0]["balance"]) if found else 0.0


def _hooks(core: InProcessCore) -> list[tuple[str, dict[str, Any]]]:
    rows = core.run(
        core.store.read(
            lambda con: con.execute(
                "SELECT id::VARCHAR, payload FROM webhook_events"
                " WHERE type = 'customer_meter.topped_up' ORDER BY created_at, id"
            ).fetchall()
        )
    )
    return [(str(i), json.loads(p)) for i, p in rows]


def test_a_rule_tops_up_at_the_crossing_up_to_its_cap(
    core: InProcessCore, seeded: dict[str, str]
) -> None:
    meter, ada = seeded["calls"], seeded["ada"]
    credit = {"meter_id": meter, "customer_id": ada, "units": 5, "external_id": "first"}
    assert core.request("POST", "/v1/meter-credits/", json=credit).status_code == 201
    rule = _made(
        core,
        "/v1/top-up-rules/",
        {
            "meter_id": meter,
            "external_customer_id": "ada",
            "threshold": 2,
            "units": 10,
            "max_per_period": 2,
            "period": "month",
            "priority": 7,
            "expires_in_days": 30,
        },
    )
    assert rule["customer_id"] == ada
    assert (rule["priority"], rule["expires_in_days"], rule["refused_reason"]) == (7, 30, None)
    _ingest(core, "ada", 3)  # 5 → 2: not below 2
    assert core.request("GET", "/v1/top-ups/").json()["pagination"]["total_count"] == 0
    _ingest(core, "ada", 1)  # 1: below, topped up to 11
    assert _balance(core, ada, meter) == 11
    _ingest(core, "ada", 10)  # 11 → 1 at the 10th: topped up to 11 (the second this month)
    _ingest(core, "ada", 10)  # 11 → 1, capped: stays below
    assert _balance(core, ada, meter) == 1
    listed = core.request("GET", "/v1/top-ups/", params={"rule_id": rule["id"]}).json()
    assert listed["pagination"]["total_count"] == 2
    made = listed["items"]  # newest first
    assert [t["number"] for t in made] == [2, 1]
    assert {t["units"] for t in made} == {10}
    assert made[1]["balance_before"] == 1
    hooks = _hooks(core)
    assert len(hooks) == 2
    assert sorted(h["data"]["top_up"]["id"] for _, h in hooks) == sorted(t["id"] for t in made)
    assert len({i for i, _ in hooks}) == 2
    first = next(h for _, h in hooks if h["data"]["top_up"]["number"] == 1)
    assert first["type"] == "customer_meter.topped_up"
    assert first["data"]["customer_meter"] == {
        "customer_id": ada,
        "meter_id": meter,
        "consumed_units": 4.0,
        "credited_units": 15,
        "balance": 11.0,
    }
    # The grant carries the rule's priority and expiry.
    grants = core.run(
        core.store.read(
            lambda con: con.execute(
                "SELECT priority, expires_at IS NOT NULL FROM credit_grants"
                " WHERE customer_id = ?::UUID AND meter_id = ?::UUID AND priority = 7",
                [ada, meter],
            ).fetchall()
        )
    )
    assert grants and all(g == (7, True) for g in grants)
    # Read, filtered, changed, deleted.
    path = f"/v1/top-up-rules/{rule['id']}"
    assert core.request("GET", path).json() == rule
    by_customer = core.request("GET", "/v1/top-up-rules/", params={"external_customer_id": "ada"})
    assert [r["id"] for r in by_customer.json()["items"]] == [rule["id"]]
    other = core.request("GET", "/v1/top-up-rules/", params={"customer_id": seeded["bob"]})
    assert other.json()["items"] == []
    changed = core.request("PATCH", path, json={"max_per_period": 3, "expires_in_days": None})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["max_per_period"], changed.json()["expires_in_days"]) == (3, None)
    _ingest(core, "ada", 1)  # below, and room for a third this month
    assert _balance(core, ada, meter) == 10
    assert core.request("DELETE", path).status_code == 204
    assert core.request("GET", path).status_code == 404
    assert core.request("DELETE", path).status_code == 404
    _ingest(core, "ada", 9)
    assert _balance(core, ada, meter) == 1  # no rule: no top-up


def test_a_rule_for_every_customer_and_a_refusal_at_an_outrunning_event(
    core: InProcessCore, seeded: dict[str, str]
) -> None:
    meter = seeded["tokens"]
    _ingest(core, "bob", 1, tokens=4)  # the largest quantity seen: 4
    body = {"meter_id": meter, "threshold": 0, "max_per_period": 5, "period": "day"}
    refused = core.request("POST", "/v1/top-up-rules/", json={**body, "units": 4})
    assert refused.status_code == 422, refused.text
    assert [e["loc"] for e in refused.json()["detail"]] == [["body", "units"]]
    rule = _made(core, "/v1/top-up-rules/", {**body, "units": 6})
    _ingest(core, "bob", 1, tokens=3)  # -7: topped up to -1 (6 > 3)
    _ingest(core, "bob", 1, tokens=9)  # an event larger than units: refused, recorded
    assert _balance(core, seeded["bob"], meter) == -10
    after = core.request("GET", f"/v1/top-up-rules/{rule['id']}").json()
    assert "consumed 9" in after["refused_reason"]
    assert after["refused_at"] is not None
    listed = core.request("GET", "/v1/top-ups/", params={"external_customer_id": "bob"}).json()
    assert [t["rule_id"] for t in listed["items"]] == [rule["id"]]
    assert core.request("PATCH", f"/v1/top-up-rules/{rule['id']}", json={"units": 2}).json()[
        "detail"
    ][0]["loc"] == ["body", "units"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"units": 0}, "units"),
        ({"units": 1}, "units"),  # a count meter's event consumes 1: a loop
        ({"threshold": "x"}, "threshold"),
        ({"max_per_period": 0}, "max_per_period"),
        ({"period": "year"}, "period"),
        ({"priority": 256}, "priority"),
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"meter_id": "nope"}, "meter_id"),
        ({"external_customer_id": "nobody"}, "external_customer_id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    core: InProcessCore, seeded: dict[str, str], change: dict[str, Any], field: str
) -> None:
    body = {
        "meter_id": seeded["calls"],
        "threshold": 1,
        "units": 5,
        "max_per_period": 1,
        "period": "day",
        **change,
    }
    response = core.request("POST", "/v1/top-up-rules/", json=body)
    assert response.status_code == 422, response.text
    assert ["body", field] in [e["loc"] for e in response.json()["detail"]]


def test_meters_whose_consumption_does_not_add_up_take_no_rules(
    core: InProcessCore, seeded: dict[str, str]
) -> None:
    body = {"meter_id": seeded["level"], "threshold": 1, "units": 5, "max_per_period": 1}
    response = core.request("POST", "/v1/top-up-rules/", json={**body, "period": "day"})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "meter_id"]]
    both = {**body, "period": "day", "customer_id": seeded["ada"], "external_customer_id": "ada"}
    assert core.request("POST", "/v1/top-up-rules/", json=both).status_code == 422
    missing = core.request("GET", "/v1/top-up-rules/", params={"external_customer_id": "nobody"})
    assert missing.status_code == 404
