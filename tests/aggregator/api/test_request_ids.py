"""Every API write is a record with a request id (`meters.commands`): a write sent again with the
same `Idempotency-Key` (after a timeout, a lost answer) is applied once and answered as it was
the first time, refusals included; the same key with another request is a 409."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.inprocess import InProcessCore


@pytest.fixture
def core(tmp_path: Path) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path) as core:
        yield core


def _post(core: InProcessCore, path: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return core.request("POST", path, json=body, headers=headers)


def _meter_and_customer(core: InProcessCore) -> tuple[str, str]:
    meter = {
        "name": "tokens",
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "sum", "property": "tokens"},
    }
    made = _post(core, "/v1/meters/", meter)
    assert made.status_code == 201, made.text
    customer = _post(core, "/v1/customers/", {"email": "ada@example.com", "external_id": "ada"})
    assert customer.status_code == 201, customer.text
    return made.json()["id"], customer.json()["id"]


def test_a_credit_sent_again_with_its_key_is_applied_once_and_answered_alike(
    core: InProcessCore,
) -> None:
    meter, _ = _meter_and_customer(core)
    credit = {"external_customer_id": "ada", "meter_id": meter, "units": 7, "external_id": "c1"}
    first = _post(core, "/v1/meter-credits/", credit, key="credit-1")
    again = _post(core, "/v1/meter-credits/", credit, key="credit-1")
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json()
    assert first.json()["customer_meter"]["credited_units"] == 7
    # Without a key, a call is a write of its own (its external_id is the ledger's own key).
    other = _post(core, "/v1/meter-credits/", {**credit, "external_id": "c2"})
    assert other.json()["customer_meter"]["credited_units"] == 14


def test_a_customer_created_again_with_its_key_is_the_same_customer(core: InProcessCore) -> None:
    body = {"email": "bob@example.com", "name": "Bob"}
    first = _post(core, "/v1/customers/", body, key="make-bob")
    again = _post(core, "/v1/customers/", body, key="make-bob")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    listed = core.request("GET", "/v1/customers/", params={"email": "bob@example.com"})
    assert listed.json()["pagination"]["total_count"] == 1


def test_a_refusal_is_kept_too_and_a_key_names_one_request(core: InProcessCore) -> None:
    meter, customer = _meter_and_customer(core)
    hold = {"customer_id": customer, "meter_id": meter, "units": 5, "external_id": "h1"}
    refused = _post(core, "/v1/meter-holds/", hold, key="hold-1")
    assert refused.status_code == 409, refused.text
    credit = {"customer_id": customer, "meter_id": meter, "units": 10, "external_id": "c"}
    assert _post(core, "/v1/meter-credits/", credit).status_code == 201
    # The balance would allow it now; the request it names was refused, and stays so.
    again = _post(core, "/v1/meter-holds/", hold, key="hold-1")
    assert (again.status_code, again.json()) == (409, refused.json())
    # The same key with another request: refused, naming the header.
    reused = _post(core, "/v1/meter-holds/", {**hold, "units": 1}, key="hold-1")
    assert reused.status_code == 409
    assert reused.json()["error"] == "IdempotencyKeyReused"
    assert "Idempotency-Key" in reused.json()["detail"]
    # A new key is a new request.
    assert _post(core, "/v1/meter-holds/", hold, key="hold-2").status_code == 201


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_a_bad_key_is_a_422_naming_the_header(core: InProcessCore, key: str) -> None:
    answer = _post(core, "/v1/customers/", {"email": "k@example.com"}, key=key)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_deletes_and_updates_sent_again_answer_alike(core: InProcessCore) -> None:
    _, customer = _meter_and_customer(core)
    patch = {"name": "Ada"}
    first = core.request(
        "PATCH", f"/v1/customers/{customer}", json=patch, headers={"Idempotency-Key": "p"}
    )
    again = core.request(
        "PATCH", f"/v1/customers/{customer}", json=patch, headers={"Idempotency-Key": "p"}
    )
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    gone = core.request("DELETE", f"/v1/customers/{customer}", headers={"Idempotency-Key": "d"})
    still = core.request("DELETE", f"/v1/customers/{customer}", headers={"Idempotency-Key": "d"})
    assert gone.status_code == still.status_code == 204
    # A new delete of a deleted customer is refused as before.
    assert core.request("DELETE", f"/v1/customers/{customer}").status_code == 404
