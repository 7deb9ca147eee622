"""Every validation rule over real HTTP: 422 with the event's `loc`, and nothing stored."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.meters.test_events import RULE_TABLE, batches
from tests.processes import Server, new_org_token
from tests.strategies import examples

# The future-timestamp rule is relative to the validator tests' fixed clock; over HTTP the
# server's clock applies (covered in test_ingest_http.py).
RULES = [rule for rule in RULE_TABLE if rule.id != "timestamp-future"]


@pytest.fixture(scope="module")
def fresh_org(server: Server) -> Iterator[httpx.Client]:
    token = new_org_token(server.data_dir, f"rules-{uuid.uuid4().hex}")
    with server.client(token) as client:
        yield client


def _finite(value: Any) -> bool:
    """JSON cannot carry NaN/Infinity (orjson would write null): such cases stay in-process."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@settings(max_examples=examples(150), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_broken_event_gets_422_at_its_loc_and_nothing_is_stored(
    fresh_org: httpx.Client, data: st.DataObject
) -> None:
    batch = data.draw(batches(min_size=1), label="batch")
    index = data.draw(st.integers(0, len(batch) - 1), label="index")
    rule = data.draw(st.sampled_from(RULES), label="rule")
    loc = ["body", "events", index, *rule.breaker(batch[index], data)]
    assume(_finite(batch))
    try:
        body = orjson.dumps({"events": batch})
    except TypeError:  # an integer beyond 64 bits: no JSON client here sends one
        assume(False)
    response = fresh_org.post(
        "/v1/events/ingest",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, (rule.id, response.text)
    assert loc in [error["loc"] for error in response.json()["detail"]], rule.id
    stored = fresh_org.get("/v1/events/", params={"limit": 1}).json()
    assert stored["pagination"]["total_count"] == 0


def test_numbers_beyond_int64_are_422_and_aggregates_stay_numbers(
    fresh_org: httpx.Client,
) -> None:
    meter = fresh_org.post(
        "/v1/meters/",
        json={
            "name": f"big {uuid.uuid4().hex}",
            "filter": {
                "conjunction": "and",
                "clauses": [{"property": "name", "operator": "eq", "value": "big"}],
            },
            "aggregation": {"func": "sum", "property": "v"},
        },
    )
    assert meter.status_code == 201, meter.text
    customer = f"big-{uuid.uuid4().hex}"

    def send(v: float) -> httpx.Response:
        event = {"name": "big", "external_customer_id": customer, "metadata": {"v": v}}
        return fresh_org.post("/v1/events/ingest", json={"events": [event, event]})

    refused = send(1.7976931348623157e308)
    assert refused.status_code == 422
    assert [e["loc"] for e in refused.json()["detail"]] == [
        ["body", "events", i, "metadata", "v"] for i in (0, 1)
    ]
    assert send(9.2e18).status_code == 200
    quantities = fresh_org.get(
        "/v1/meters/" + meter.json()["id"] + "/quantities",
        params={
            "start_timestamp": "2026-01-01T00:00:00Z",
            "end_timestamp": "2027-12-31T00:00:00Z",
            "interval": "year",
            "external_customer_id": customer,
        },
    )
    assert quantities.status_code == 200, quantities.text
    assert quantities.json()["total"] == 2 * 9.2e18
