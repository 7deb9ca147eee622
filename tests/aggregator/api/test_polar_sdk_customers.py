"""customers.delete / delete_external / export / list(active) through polar-sdk: what a deletion
keeps (events, quantities) and drops (the customer, its customer meters, balance and sessions),
Polar's CSV export, and `active` without subscriptions."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound

from tests.processes import Server, new_org_token


def _org(server: Server) -> tuple[Polar, httpx.Client]:
    token = new_org_token(server.data_dir, f"deletion-{uuid.uuid4().hex}")
    return Polar(token, base_url=server.url), server.client(token)


def _ingest(http: httpx.Client, *events: dict[str, object]) -> httpx.Response:
    return http.post("/v1/events/ingest", json={"events": list(events)})


def test_delete_keeps_events_and_drops_the_ledger(server: Server) -> None:
    polar, http = _org(server)
    meter = polar.meters.create(
        name="tokens",
        filter={"conjunction": "and", "clauses": []},
        aggregation={"func": "sum", "property": "tokens"},
    )
    ada = polar.customers.create(email="ada@example.com", external_id="ada")
    use = {"name": "use", "metadata": {"tokens": 5}}
    sent = _ingest(http, {**use, "customer_id": ada.id}, {**use, "external_customer_id": "ada"})
    assert sent.status_code == 200, sent.text
    grant = {"customer_id": ada.id, "meter_id": meter.id, "units": 100, "external_id": "g"}
    assert http.post("/v1/meter-credits/", json=grant).status_code == 201
    session = polar.customer_sessions.create(customer_id=ada.id)
    assert server.client(session.token).get("/v1/customer-portal/meters/").status_code == 200

    polar.customers.delete(ada.id)

    with pytest.raises(ResourceNotFound):
        polar.customers.get(ada.id)
    with pytest.raises(ResourceNotFound):
        polar.customers.get_external("ada")
    with pytest.raises(ResourceNotFound):
        polar.customers.delete(ada.id)
    assert polar.customers.list().items == []
    assert polar.customer_meters.list().items == []
    assert server.client(session.token).get("/v1/customer-portal/meters/").status_code == 401
    # Its events stay (the credit's system event too), and so do the meter's quantities.
    assert polar.events.list(name="use").pagination.total_count == 2
    assert polar.events.list(name="meter.credited").pagination.total_count == 1
    now = datetime.now(UTC)
    quantities = polar.meters.quantities(
        meter.id,
        start_timestamp=(now - timedelta(days=1)).isoformat(),
        end_timestamp=(now + timedelta(days=1)).isoformat(),
        interval="day",
    )
    assert quantities.total == 10
    # Its id names nobody now; its external id and email are free again.
    refused = _ingest(http, {**use, "customer_id": ada.id})
    assert refused.status_code == 422 and "customer_id" in str(refused.json()["detail"])
    assert _ingest(http, {**use, "external_customer_id": "ada"}).status_code == 200
    again = polar.customers.create(email="ada@example.com", external_id="ada")
    (cm,) = polar.customer_meters.list(customer_id=again.id).items
    # Only what arrived after the deletion, none of the old usage nor credits.
    assert (cm.consumed_units, cm.credited_units, cm.balance) == (5, 0, -5)


def test_delete_external_with_anonymize(server: Server) -> None:
    polar, _ = _org(server)
    polar.customers.create(email="bob@example.com", external_id="bob", name="Bob")
    keep = polar.customers.create(email="cy@example.com", external_id="cy")
    polar.customers.delete_external("bob", anonymize=True)
    with pytest.raises(ResourceNotFound):
        polar.customers.delete_external("bob")
    assert [c.id for c in polar.customers.list().items] == [keep.id]
    with pytest.raises(HTTPValidationError):
        polar.customers.delete(str(uuid.uuid4())[:8])


def test_export_is_polars_csv_of_this_organization_only(server: Server) -> None:
    polar, _ = _org(server)
    other, _ = _org(server)
    other.customers.create(email="other@example.com", external_id="other")
    polar.customers.create(
        email="ada@example.com",
        external_id="ada",
        name="Ada, Countess",
        billing_address={"country": "GB", "line1": "1 St James's Sq", "city": "London"},
        metadata={"plan": "pro", "seats": 3},
    )
    polar.customers.create(email="bob@example.com")
    text = polar.customers.export()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == [
        "ID",
        "External ID",
        "Created At",
        "Email",
        "Name",
        "Tax ID",
        "Billing Address Line 1",
        "Billing Address Line 2",
        "Billing Address City",
        "Billing Address State",
        "Billing Address Zip",
        "Billing Address Country",
        "Metadata",
    ]
    by_email = {r[3]: r for r in rows[1:]}
    assert set(by_email) == {"ada@example.com", "bob@example.com"}
    ada = by_email["ada@example.com"]
    assert ada[1] == "ada" and ada[4] == "Ada, Countess"
    assert (ada[6], ada[8], ada[11]) == ("1 St James's Sq", "London", "GB")
    assert ada[12] == '{"plan":"pro","seats":3}'
    assert by_email["bob@example.com"][1] == "" and by_email["bob@example.com"][12] == ""


def test_active_customers_are_those_with_a_subscription_so_none(server: Server) -> None:
    polar, _ = _org(server)
    ada = polar.customers.create(email="ada@example.com")
    assert polar.customers.list(active=True).items == []
    assert [c.id for c in polar.customers.list(active=False).items] == [ada.id]
