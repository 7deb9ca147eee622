"""polar-sdk, in both API versions it ships that meterline takes (2026-04 and 2026-10), loads
every events read it offers after voids, an amendment and a replacement: lists (with each
filter), one event (a voided one too), names, event types, customer meters and meter
quantities; the voided events are hidden and every figure counts the current events only.
The corrections' system events (`event.voided`, ...: meterline's own, unknown to polar-sdk)
never reach a client naming a Polar API version, even asked for by name."""

from __future__ import annotations

import json
import uuid
from types import ModuleType
from typing import Any

import httpx
import pytest
from polar import v2026_04, v2026_10

from tests.processes import Server, new_org_token

pytestmark = pytest.mark.slow  # polar-sdk builds its loaders once per version: about 1.5 s each

DAY = "2026-02-01"
WINDOW = {"start_timestamp": f"{DAY}T00:00:00Z", "end_timestamp": "2026-02-02T00:00:00Z"}


def _at(hour: int) -> str:
    return f"{DAY}T{hour:02d}:00:00Z"


@pytest.fixture(scope="module", params=[v2026_04, v2026_10], ids=["2026-04", "2026-10"])
def corrected(request: pytest.FixtureRequest, server: Server) -> dict[str, Any]:
    """A fresh organization, with its client in the version's module: a customer with six
    events (tokens 1..6, one a child of another), of which 1 and 2 are voided, 3 amended to 30
    and 5 and 6 replaced by one of 50; a count and a sum meter; a credit."""
    version: ModuleType = request.param
    token = new_org_token(server.data_dir, f"corrections-{uuid.uuid4().hex}")
    polar = version.Polar(token, base_url=server.url)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
    acme = polar.customers.create(email=f"{uuid.uuid4().hex}@example.com", external_id="acme")
    meters = {
        name: polar.meters.create(
            name=name,
            filter={
                "conjunction": "and",
                "clauses": [{"property": "name", "operator": "eq", "value": "call"}],
            },
            aggregation=aggregation,
        ).id
        for name, aggregation in [
            ("calls", {"func": "count"}),
            ("tokens", {"func": "sum", "property": "tokens"}),
        ]
    }
    events: list[dict[str, Any]] = [
        {
            "name": "call",
            "external_customer_id": "acme",
            "external_id": f"e{i}",
            "timestamp": _at(i),
            "metadata": {"tokens": i, "model": "m"},
        }
        for i in range(1, 7)
    ]
    events[3]["parent_id"] = "e3"  # 4 is 3's child
    assert polar.events.ingest(events=events).inserted == 6
    credited = http.post(
        "/v1/meter-credits/",
        json={
            "customer_id": acme.id,
            "meter_id": meters["tokens"],
            "units": 100,
            "external_id": "g",
        },
    )
    assert credited.status_code == 201, credited.text
    ids = {e.metadata["tokens"]: e.id for e in polar.events.list(name="call", limit=100).items}

    def ok(answer: httpx.Response) -> Any:
        assert answer.status_code == 200, answer.text
        return answer.json()

    ok(http.post("/v1/events/void", json={"ids": [ids[1]], "reason": "sent twice"}))
    ok(http.post("/v1/events/void", json={"external_ids": ["e2"], "reason": "test traffic"}))
    amended = ok(
        http.patch(f"/v1/events/{ids[3]}", json={"metadata": {"tokens": 30, "model": "m"}})
    )
    replace = {
        "external_customer_id": "acme",
        "start_timestamp": _at(5),
        "end_timestamp": _at(7),
        "events": [{**events[4], "metadata": {"tokens": 50, "model": "m"}}],
        "reason": "re-sent from the source",
    }
    ok(http.post("/v1/events/replace", json=replace))
    current = {e.metadata["tokens"]: e.id for e in polar.events.list(name="call", limit=100).items}
    return {
        "polar": polar,
        "http": http,
        "acme": acme.id,
        "meters": meters,
        "voided": [ids[1], ids[2], ids[3], ids[5], ids[6]],
        "current": current,
        "amended": amended["id"],
    }


def test_events_lists_load_and_hide_the_voided(corrected: dict[str, Any]) -> None:
    polar, current = corrected["polar"], corrected["current"]
    assert sorted(current) == [4, 30, 50]
    assert current[30] == corrected["amended"]

    def listed(**filters: Any) -> list[float]:
        found = polar.events.list(**{"limit": 100, **filters})
        for event in found.items:
            assert event.id not in corrected["voided"]
        return sorted(e.metadata["tokens"] if e.source == "user" else -1 for e in found.items)

    everything = polar.events.list(limit=100)
    assert everything.pagination.total_count == 4  # the three calls and the credit
    assert listed(name="call") == [4, 30, 50]
    assert listed(customer_id=corrected["acme"], name="call") == [4, 30, 50]
    assert listed(external_customer_id="acme", source="user") == [4, 30, 50]
    assert listed(meter_id=corrected["meters"]["tokens"]) == [4, 30, 50]
    assert listed(source="system") == [-1]  # meter.credited; no correction's
    assert listed(start_timestamp=_at(3), end_timestamp=_at(4), name="call") == [4, 30]
    assert listed(query="call") == [4, 30, 50]
    clause = {"property": "tokens", "operator": "gte", "value": 30}
    assert listed(filter=json.dumps({"conjunction": "and", "clauses": [clause]})) == [30, 50]
    assert listed(metadata={"model": "m"}) == [4, 30, 50]
    assert listed(sorting=["-timestamp"], name="call", limit=2) == [4, 50]
    # 4 is a child of 3 (by its external id), which is the current version's: 30.
    assert listed(depth=0, name="call") == [30, 50]
    assert listed(depth=1, name="call") == [4, 30, 50]
    assert listed(parent_id=current[30]) == [4]
    assert polar.events.get(current[4]).parent_id == current[30]
    assert polar.events.get(current[30]).child_count == 1
    # Asked for by name, the corrections' system events stay away from a Polar client.
    assert listed(name=["event.voided", "event.amended", "event.replaced"]) == []
    page = polar.events.list(name="call", limit=2, page=2, sorting=["timestamp"])
    assert [e.metadata["tokens"] for e in page.items] == [50]
    # The voided ones are there for a client that asks (meterline's own parameter).
    shown = corrected["http"].get("/v1/events/", params={"voided": "true", "name": "call"})
    assert shown.json()["pagination"]["total_count"] == 8


def test_one_event_loads_current_voided_or_not_and_a_correction_is_not_found(
    corrected: dict[str, Any],
) -> None:
    polar, http = corrected["polar"], corrected["http"]
    amended = polar.events.get(corrected["amended"])
    assert amended.metadata["tokens"] == 30
    voided = polar.events.get(corrected["voided"][0])  # readable by its id
    assert voided.metadata["tokens"] == 1
    assert http.get(f"/v1/events/{voided.id}").json()["void_reason"] == "sent twice"
    listed = http.get("/v1/events/", params={"name": "event.voided"}).json()["items"]
    assert len(listed) == 2  # without Polar-Version, meterline's own read shows them
    missing = http.get(f"/v1/events/{listed[0]['id']}", headers={"Polar-Version": "2026-10"})
    assert missing.status_code == 404, missing.text


def test_names_types_customer_meters_and_quantities_count_the_current_events(
    corrected: dict[str, Any],
) -> None:
    polar, meters = corrected["polar"], corrected["meters"]
    names = {(n.name, n.source): n for n in polar.events.list_names(limit=100).items}
    assert set(names) == {("call", "user"), ("meter.credited", "system")}
    assert names["call", "user"].occurrences == 3
    assert (names["call", "user"].first_seen, names["call", "user"].last_seen) == (
        "2026-02-01T03:00:00Z",
        "2026-02-01T05:00:00Z",
    )
    types = {t.name: t for t in polar.event_types.list(limit=100).items}
    assert set(types) == {"call", "meter.credited"}
    assert types["call"].occurrences == 3

    customer_meters = {
        m.meter_id: m
        for m in polar.customer_meters.list(customer_id=corrected["acme"], limit=100).items
    }
    tokens = customer_meters[meters["tokens"]]
    assert (tokens.consumed_units, tokens.credited_units, tokens.balance) == (84, 100, 16)
    assert customer_meters[meters["calls"]].consumed_units == 3
    assert polar.customer_meters.get(tokens.id).balance == 16

    day = polar.meters.quantities(meters["tokens"], interval="day", **WINDOW)
    assert day.total == 84 and [q.quantity for q in day.quantities] == [84, 0]
    hours = polar.meters.quantities(meters["calls"], interval="hour", **WINDOW)
    assert [q.quantity for q in hours.quantities[:7]] == [0, 0, 0, 1, 1, 1, 0]
    assert hours.total == 3
