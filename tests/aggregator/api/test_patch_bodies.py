"""Every PATCH route's body is a `meters.wire.Patch`, and null for any of its fields is never a
5xx: a field that may not be null is a 422 naming it, one Polar reads as left out changes
nothing, and one null empties is emptied (or refused for the resource's own reason)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from aggregator.api.openapi import ApiRoute
from meters.wire import Patch
from tests.inprocess import InProcessCore


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("patches"), private_webhooks=True) as running:
        yield running


@pytest.fixture(scope="module")
def ids(core: InProcessCore) -> dict[str, str]:
    """What each PATCH path names: one stored thing of each kind."""

    def made(path: str, body: dict[str, Any]) -> str:
        response = core.request("POST", path, json=body)
        assert response.status_code in (200, 201), response.text
        return str(response.json()["id"])

    everything = {"conjunction": "and", "clauses": []}
    event = {"name": "call", "external_customer_id": "c1"}
    assert core.request("POST", "/v1/events/ingest", json={"events": [event]}).status_code == 200
    meter = made(
        "/v1/meters/", {"name": "calls", "filter": everything, "aggregation": {"func": "count"}}
    )
    rule = {"meter_id": meter, "threshold": 1, "units": 5, "max_per_period": 1, "period": "day"}
    found = {
        "/v1/meters/{id}": meter,
        "/v1/top-up-rules/{id}": made("/v1/top-up-rules/", rule),
        "/v1/customers/{id}": made("/v1/customers/", {"email": "a@b.co", "external_id": "c1"}),
        "/v1/customers/external/{external_id:path}": "c1",
        "/v1/webhooks/endpoints/{id}": made(
            "/v1/webhooks/endpoints",
            {"url": "http://127.0.0.1:9/hook", "format": "raw", "events": ["meter.alert"]},
        ),
        "/v1/event-types/{id}": core.request("GET", "/v1/event-types/").json()["items"][0]["id"],
        "/v1/events/{id}": core.request("GET", "/v1/events/").json()["items"][0]["id"],
    }
    core.settle()  # the meter's backfill done: what it shows stays as it is
    return found


# What a route requires besides the field under test.
REQUIRED: dict[str, dict[str, Any]] = {"/v1/event-types/{id}": {"label": "Calls"}}


def _patches(core: InProcessCore) -> list[tuple[ApiRoute, type[Patch]]]:
    found = []
    for route in core.app.routes:
        if isinstance(route, ApiRoute) and route.method == "PATCH" and route.operation.body:
            body = route.operation.body
            assert isinstance(body, type) and issubclass(body, Patch), route.path
            found.append((route, body))
    return found


def test_null_for_any_field_of_any_patch_is_never_a_5xx(
    core: InProcessCore, ids: dict[str, str]
) -> None:
    patches = _patches(core)
    assert {route.path for route, _ in patches} == set(ids)  # every PATCH with a body, seeded
    for route, model in patches:
        template = route.path
        path = template.replace("{id}", ids[template]).replace("{external_id:path}", "c1")
        for field in model.model_fields:
            body = {**REQUIRED.get(template, {}), field: None}
            before = core.request("GET", path).json() if field in model.NULL_IGNORED else None
            response = core.request("PATCH", path, json=body)
            assert response.status_code < 500, (template, field, response.text)
            locs = [e["loc"] for e in response.json().get("detail", [])]
            if field not in model.nullable():
                assert response.status_code == 422, (template, field, response.text)
                assert ["body", field] in locs, (template, field, locs)
            elif before is not None:  # read as left out: nothing changes but modified_at
                assert response.status_code == 200, (template, field, response.text)
                after = response.json()
                assert {k: v for k, v in after.items() if k != "modified_at"} == {
                    k: v for k, v in before.items() if k != "modified_at"
                }, (template, field)


def test_the_reported_nulls(core: InProcessCore, ids: dict[str, str]) -> None:
    endpoint = f"/v1/webhooks/endpoints/{ids['/v1/webhooks/endpoints/{id}']}"
    kept = core.request("PATCH", endpoint, json={"events": None})
    assert kept.status_code == 200, kept.text  # as Polar: null is no change
    assert kept.json()["events"] == ["meter.alert"]
    customer = f"/v1/customers/{ids['/v1/customers/{id}']}"
    refused = core.request("PATCH", customer, json={"type": None})
    assert refused.status_code == 422, refused.text
    assert [e["loc"] for e in refused.json()["detail"]] == [["body", "type"]]
    assert core.request("GET", customer).json()["type"] == "individual"


def test_the_document_says_which_fields_take_null(core: InProcessCore) -> None:
    doc = core.request("GET", "/openapi.json").json()
    for route, model in _patches(core):
        body = doc["paths"][route.openapi_path()]["patch"]["requestBody"]["content"]
        name = body["application/json"]["schema"]["$ref"].split("/")[-1]
        for field, schema in doc["components"]["schemas"][name]["properties"].items():
            takes_null = {"type": "null"} in schema.get("anyOf", [])
            assert takes_null == (field in model.nullable()), (model.__name__, field)
