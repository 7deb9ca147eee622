"""`POST /v1/events/void` with a filter over HTTP (in process): answered 202 with a job that
`GET /v1/events/void/{id}` reads until done, the customer's events then voided and counting
nowhere, the system event recorded once; the same request sent again with its
`Idempotency-Key` finds the same job; another organization's job is a 404; a filter matching
more than the limit is a 422 naming `filter`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.store.tables import void_jobs
from tests.inprocess import InProcessCore

METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("voids")) as running:
        running.voider._chunk = running.voider._min_chunk = 7
        assert running.request("POST", "/v1/meters/", json=METER).status_code == 201
        for name in ("ada", "bob"):
            body = {"email": f"{name}@example.com", "external_id": name}
            assert running.request("POST", "/v1/customers/", json=body).status_code == 201
        events = [
            {"name": "call", "external_customer_id": name, "metadata": {"tokens": i}}
            for i in range(40)
            for name in ("ada", "bob")
        ]
        answer = running.request("POST", "/v1/events/ingest", json={"events": events})
        assert answer.json() == {"inserted": 80, "duplicates": 0}
        yield running


def _consumed(core: InProcessCore, customer: str) -> float:
    items = core.request("GET", "/v1/customer-meters/", params={"limit": 10}).json()["items"]
    found = [i for i in items if i["customer"]["external_id"] == customer]
    return float(found[0]["consumed_units"])


def _listed(core: InProcessCore, customer: str, **params: Any) -> int:
    query = {"external_customer_id": customer, "limit": 1, **params}
    return int(core.request("GET", "/v1/events/", params=query).json()["pagination"]["total_count"])


def test_a_void_by_filter_is_a_job_read_until_done(core: InProcessCore) -> None:
    assert _consumed(core, "ada") == sum(range(40))
    body = {"filter": {"external_customer_id": "ada"}, "reason": "sent twice"}
    headers = {"Idempotency-Key": "void-ada"}
    answer = core.request("POST", "/v1/events/void", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert (job["status"], job["done"], job["matched"], job["reason"]) == (
        "running",
        False,
        40,
        "sent twice",
    )
    assert job["filter"]["external_customer_id"] == "ada"
    core.voids_done()
    done = core.request("GET", f"/v1/events/void/{job['id']}").json()
    assert (done["status"], done["done"], done["voided"]) == ("done", True, 40)
    assert done["finished_at"] is not None
    assert _consumed(core, "ada") == 0 and _consumed(core, "bob") == sum(range(40))
    assert _listed(core, "ada") == 0 and _listed(core, "ada", voided="true") == 40
    # Sent again with its key: the same job, as it is now; nothing voided twice.
    again = core.request("POST", "/v1/events/void", json=body, headers=headers)
    assert again.status_code == 202 and again.json() == done
    recorded = core.request("GET", "/v1/events/", params={"name": "event.voided"}).json()
    assert [e["metadata"]["voided"] for e in recorded["items"]] == [40]
    assert recorded["items"][0]["metadata"]["job_id"] == job["id"]


def test_another_organizations_job_is_not_found(core: InProcessCore, tmp_path: Path) -> None:
    body = {"filter": {"external_customer_id": "nobody"}, "reason": "none"}
    job = core.request("POST", "/v1/events/void", json=body).json()
    assert job["done"] and job["matched"] == 0
    other = core.registry.create_token(core.registry.organization("other"), "tests")
    headers = {"Authorization": f"Bearer {other}"}
    assert core.request("GET", f"/v1/events/void/{job['id']}", headers=headers).status_code == 404


def test_a_filter_matching_more_than_the_limit_is_a_422_naming_filter(
    core: InProcessCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(void_jobs, "MAX_FILTERED", 10)
    body = {"filter": {"external_customer_id": "bob"}, "reason": "too many"}
    answer = core.request("POST", "/v1/events/void", json=body)
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "filter"] and "at most 10" in error["msg"]
    assert _listed(core, "bob") == 40
