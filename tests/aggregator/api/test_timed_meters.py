"""`latest` and `integral` meters through the API: created and read back, quantities in a
timezone, customer meters and alerts on a latest meter, and a 422 naming the field for what
an integral meter has no use for (credits, alerts) and what neither takes (holds)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.settings import WebhookSettings
from tests.inprocess import InProcessCore

DAY = datetime(2026, 3, 2, tzinfo=UTC)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[InProcessCore]:
    running = InProcessCore(tmp_path / "core")
    # An endpoint on loopback for `meter.alert` events to be recorded (no sender runs here).
    running.settings = replace(running.settings, webhooks=WebhookSettings(allow_private=True))
    with running:
        yield running


def _meter(core: InProcessCore, name: str, aggregation: dict[str, Any]) -> dict[str, Any]:
    clause = {"property": "name", "operator": "eq", "value": "storage"}
    body = {"name": name, "filter": {"conjunction": "and", "clauses": [clause]}}
    created = core.request("POST", "/v1/meters/", json={**body, "aggregation": aggregation})
    assert created.status_code == 201, created.text
    return dict(created.json())


def _ingest(core: InProcessCore, *readings: tuple[str, timedelta, float]) -> None:
    events = [
        {
            "name": "storage",
            "external_customer_id": customer,
            "timestamp": (DAY + at).isoformat(),
            "metadata": {"gb": gb},
        }
        for customer, at, gb in readings
    ]
    answer = core.request("POST", "/v1/events/ingest", json={"events": events})
    assert answer.status_code == 200, answer.text
    core.settle()


def _quantities(core: InProcessCore, meter: dict[str, Any], **params: Any) -> dict[str, Any]:
    window = {
        "start_timestamp": DAY.isoformat(),
        "end_timestamp": (DAY + timedelta(days=2) - timedelta(microseconds=1)).isoformat(),
        "interval": "day",
    }
    answer = core.request(
        "GET", f"/v1/meters/{meter['id']}/quantities", params={**window, **params}
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_an_integral_meter_integrates_each_day_with_the_value_carried(
    core: InProcessCore,
) -> None:
    """10 GB from 06:00, 30 GB from 18:00 (sent first: arrival order does not matter), held
    into the next day: 10 × 12 + 30 × 6 = 300 GB-hours on day one, 30 × 24 = 720 on day two."""
    meter = _meter(core, "storage-gb-hours", {"func": "integral", "property": "gb"})
    assert meter["aggregation"] == {"func": "integral", "property": "gb", "per": "hour"}
    _ingest(core, ("acme", timedelta(hours=18), 30))
    _ingest(core, ("acme", timedelta(hours=6), 10))
    found = _quantities(core, meter)
    assert [q["quantity"] for q in found["quantities"]] == [300.0, 720.0]
    assert found["total"] == 1020.0
    # In another timezone, days start five hours later (UTC-5): the first ends at 05:00 UTC
    # of the next day, 10 × 12 + 30 × 11 = 450.
    shifted = _quantities(core, meter, timezone="America/New_York")
    assert shifted["quantities"][1]["quantity"] == 450.0


def test_a_latest_meter_keeps_the_last_reading_and_its_customer_meter(
    core: InProcessCore,
) -> None:
    meter = _meter(core, "seats", {"func": "latest", "property": "gb"})
    core.request("POST", "/v1/customers/", json={"email": "a@example.com", "external_id": "acme"})
    _ingest(core, ("acme", timedelta(hours=9), 7), ("acme", timedelta(hours=8), 12))
    _ingest(core, ("acme", timedelta(hours=9), 5))  # same instant: the greater value, 7
    found = _quantities(core, meter)
    assert [q["quantity"] for q in found["quantities"]] == [7.0, 0.0]
    listed = core.request("GET", "/v1/customer-meters/", params={"meter_id": meter["id"]}).json()[
        "items"
    ]
    assert [(c["consumed_units"], c["balance"]) for c in listed] == [(7.0, -7.0)]


def test_an_alert_on_a_latest_meter_fires_when_the_reading_crosses(
    core: InProcessCore,
) -> None:
    meter = _meter(core, "seats-alerted", {"func": "latest", "property": "gb"})
    core.request("POST", "/v1/customers/", json={"email": "a@example.com", "external_id": "acme"})
    alert = {
        "meter_id": meter["id"],
        "external_customer_id": "acme",
        "metric": "consumed_units",
        "operator": "gte",
        "threshold": 10,
        "external_id": f"alert-{uuid.uuid4().hex}",
    }
    created = core.request("POST", "/v1/meter-alerts/", json=alert)
    assert created.status_code == 201, created.text
    endpoint = {"url": "http://127.0.0.1:9/hook", "format": "raw", "events": ["meter.alert"]}
    assert core.request("POST", "/v1/webhooks/endpoints", json=endpoint).status_code == 201
    # 12 at 08:00 arrives after 7 at 09:00: the latest stays 7, nothing fires.
    _ingest(core, ("acme", timedelta(hours=9), 7))
    _ingest(core, ("acme", timedelta(hours=8), 12))
    assert _fired(core) == []
    _ingest(core, ("acme", timedelta(hours=10), 11))
    assert _fired(core) == [11.0]


def _fired(core: InProcessCore) -> list[float]:
    """The consumed units of each `meter.alert` event, in order."""
    rows = core.run(
        core.store.read(
            lambda con: con.execute(
                "SELECT payload FROM webhook_events ORDER BY created_at"
            ).fetchall()
        )
    )
    return [json.loads(r[0])["data"]["customer_meter"]["consumed_units"] for r in rows]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/meter-credits/", {"units": 10, "external_id": "c1"}),
        ("/v1/meter-holds/", {"units": 1, "external_id": "h1"}),
        (
            "/v1/meter-alerts/",
            {"metric": "balance", "operator": "lte", "threshold": 0, "external_id": "a1"},
        ),
    ],
)
def test_what_an_integral_meter_has_no_use_for_is_a_422_naming_the_meter(
    core: InProcessCore, path: str, body: dict[str, Any]
) -> None:
    meter = _meter(core, "gb-hours", {"func": "integral", "property": "gb"})
    core.request("POST", "/v1/customers/", json={"email": "a@example.com", "external_id": "acme"})
    answer = core.request(
        "POST", path, json={**body, "meter_id": meter["id"], "external_customer_id": "acme"}
    )
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "meter_id"]
    assert "integral" in error["msg"]


def test_a_hold_on_a_latest_meter_is_a_422(core: InProcessCore) -> None:
    meter = _meter(core, "seats-held", {"func": "latest", "property": "gb"})
    core.request("POST", "/v1/customers/", json={"email": "a@example.com", "external_id": "acme"})
    body = {"meter_id": meter["id"], "external_customer_id": "acme", "units": 1}
    answer = core.request("POST", "/v1/meter-holds/", json={**body, "external_id": "h1"})
    assert answer.status_code == 422, answer.text
    assert "latest" in answer.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "aggregation",
    [
        {"func": "integral", "property": "gb", "per": "week"},
        {"func": "integral", "property": "name"},
        {"func": "latest"},
    ],
)
def test_a_wrong_timed_aggregation_is_a_422(
    core: InProcessCore, aggregation: dict[str, Any]
) -> None:
    body = {"name": "wrong", "filter": {"conjunction": "and", "clauses": []}}
    answer = core.request("POST", "/v1/meters/", json={**body, "aggregation": aggregation})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][:2] == ["body", "aggregation"]
