"""A customer is routed by the external id it was made with, or by its id (`intake.routing`):
giving an existing customer an external id that events already name would split its usage
between two routing keys, so it is a 409 naming why, in every deployment (the sharded one is in
`tests/aggregator/intake/test_shards.py`). An external id no event names yet is given; a
customer made with a named one takes its events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.inprocess import InProcessCore


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("external-ids")) as running:
        yield running


def _customer(core: InProcessCore, **body: str) -> str:
    made = core.request(
        "POST", "/v1/customers/", json={"email": f"{uuid.uuid4().hex}@b.co", **body}
    )
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def test_an_external_id_events_already_name_is_not_given_to_a_customer(
    core: InProcessCore,
) -> None:
    events = [{"name": "call", "external_customer_id": "named"}]
    assert core.request("POST", "/v1/events/ingest", json={"events": events}).status_code == 200
    core.settle()
    customer = _customer(core)
    refused = core.request("PATCH", f"/v1/customers/{customer}", json={"external_id": "named"})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "ExternalIdInUse"
    assert "Events already name the external customer id 'named'" in refused.json()["detail"]
    assert core.request("GET", f"/v1/customers/{customer}").json()["external_id"] is None
    # One no event names is given; a customer made with the named one has its events.
    given = core.request("PATCH", f"/v1/customers/{customer}", json={"external_id": "fresh"})
    assert given.status_code == 200, given.text
    assert given.json()["external_id"] == "fresh"
    other = _customer(core, external_id="named")
    found = core.request("GET", "/v1/events/", params={"customer_id": other}).json()
    assert found["pagination"]["total_count"] == 1
