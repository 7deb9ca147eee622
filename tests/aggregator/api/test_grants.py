"""Credit grants through the API: `POST /v1/meter-credits/` with `priority` and `expires_at`,
their 422s naming the field, and `GET /v1/customer-meters/{id}/grants` (meterline's own read),
whose remaining units less what no grant covers is the balance Polar's fields show."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aggregator.background import PlanCycler
from tests.inprocess import InProcessCore


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("grants")) as running:
        yield running


def _setup(core: InProcessCore, name: str) -> dict[str, str]:
    meter = core.request(
        "POST",
        "/v1/meters/",
        json={
            "name": name,
            "filter": {
                "conjunction": "and",
                "clauses": [{"property": "name", "operator": "eq", "value": name}],
            },
            "aggregation": {"func": "count"},
        },
    )
    customer = core.request("POST", "/v1/customers/", json={"email": f"{name}@example.com"})
    assert meter.status_code == 201 and customer.status_code == 201
    return {"meter_id": meter.json()["id"], "customer_id": customer.json()["id"]}


def _expire_by(core: InProcessCore, moment: datetime) -> None:
    """Wait until `moment` has passed, then run the timed writes due (what `meterline up`'s
    plan cycler does every second)."""
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.05)  # the point

    assert core.run(PlanCycler(core.store).run_due()) >= 1


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_grants_burn_in_order_and_an_expiry_takes_what_is_unused(core: InProcessCore) -> None:
    ref = _setup(core, "grants_order")
    soon = datetime.now(UTC) + timedelta(seconds=2)
    later = datetime.now(UTC) + timedelta(days=30)
    credits: list[dict[str, Any]] = [
        {"units": 100, "external_id": "paid", "priority": 200},
        {"units": 10, "external_id": "trial", "expires_at": _iso(soon)},
        {"units": 20, "external_id": "promo", "expires_at": _iso(later)},
    ]
    for credit in credits:
        answer = core.request("POST", "/v1/meter-credits/", json={**ref, **credit})
        assert answer.status_code == 201, answer.text
    events = [{"name": "grants_order", "customer_id": ref["customer_id"]}] * 15
    assert core.request("POST", "/v1/events/ingest", json={"events": events}).status_code == 200
    cm = core.request("GET", "/v1/customer-meters/", params=ref).json()["items"][0]
    grants = core.request("GET", f"/v1/customer-meters/{cm['id']}/grants").json()
    remaining = {g["priority"]: g["remaining_units"] for g in grants["items"]}
    # The trial (earliest expiry) burns first, then the promo; the paid credits last.
    assert [(g["units"], g["remaining_units"]) for g in grants["items"]] == [
        (100, 100.0),
        (10, 0.0),
        (20, 15.0),
    ]
    assert remaining[200] == 100.0
    assert sum(g["remaining_units"] for g in grants["items"]) - grants[
        "unallocated_units"
    ] == pytest.approx(cm["balance"])
    assert (grants["credited_units"], grants["balance"]) == (130, 115.0)
    # The trial was used up: its expiry takes nothing; the balance stays.
    _expire_by(core, soon)
    grants = core.request("GET", f"/v1/customer-meters/{cm['id']}/grants").json()
    assert grants["items"][1]["expired"] and grants["items"][1]["expired_units"] == 0
    assert grants["balance"] == 115.0


def test_an_unused_grant_leaves_the_balance_at_its_expiry(core: InProcessCore) -> None:
    ref = _setup(core, "grants_expiry")
    soon = datetime.now(UTC) + timedelta(seconds=1)
    credit = {**ref, "units": 10, "external_id": "x", "expires_at": _iso(soon)}
    cm = core.request("POST", "/v1/meter-credits/", json=credit).json()["customer_meter"]
    assert cm["credited_units"] == 10
    _expire_by(core, soon)
    cm = core.request("GET", f"/v1/customer-meters/{cm['id']}").json()
    assert (cm["credited_units"], cm["balance"]) == (0, 0.0)
    history = core.request(
        "GET", "/v1/events/", params={"customer_id": ref["customer_id"], "source": "system"}
    ).json()["items"]
    expired = [e for e in history if e["name"] == "meter.credit_expired"]
    assert len(expired) == 1 and expired[0]["metadata"]["units"] == 10
    assert expired[0]["label"] == "Meter Credit Expired"


def _loc(response: Any) -> list[Any]:
    assert response.status_code == 422, response.text
    return list(response.json()["detail"][0]["loc"])


def test_bad_grant_fields_are_a_422_naming_the_field(core: InProcessCore) -> None:
    ref = {**_setup(core, "grants_refused"), "external_id": "refused"}
    now = datetime.now(UTC)
    refused = [
        ({"units": 5, "priority": 256}, ["body", "priority"]),
        ({"units": 5, "priority": -1}, ["body", "priority"]),
        ({"units": 5, "priority": "1"}, ["body", "priority"]),
        ({"units": 5, "expires_at": _iso(now - timedelta(seconds=1))}, ["body", "expires_at"]),
        ({"units": 5, "expires_at": _iso(now + timedelta(days=6 * 366))}, ["body", "expires_at"]),
        ({"units": 5, "expires_at": "soon"}, ["body", "expires_at"]),
        ({"units": -5, "priority": 1}, ["body", "priority"]),
        ({"units": -5, "expires_at": _iso(now + timedelta(days=1))}, ["body", "expires_at"]),
    ]
    before = core.table_counts()
    for body, loc in refused:
        answer = core.request("POST", "/v1/meter-credits/", json={**ref, **body})
        assert _loc(answer) == loc, (body, answer.text)
    assert core.table_counts() == before


def test_grants_of_an_unknown_customer_meter_are_a_404(core: InProcessCore) -> None:
    answer = core.request("GET", "/v1/customer-meters/00000000-0000-4000-8000-000000000000/grants")
    assert answer.status_code == 404
