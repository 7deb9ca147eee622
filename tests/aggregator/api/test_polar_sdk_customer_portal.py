"""Customer sessions and the customer portal's meters through polar-sdk: a session token reads
its own customer's meters, consumption, credits and balance, nothing of any other customer and
no organization route; an organization token reads no portal route; sessions expire."""

from __future__ import annotations

import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound

from aggregator.auth import TokenRegistry
from tests.inprocess import ServedCore
from tests.processes import Server, new_org_token

SUM = {"conjunction": "and", "clauses": []}


def _organization(server: Server) -> tuple[Polar, httpx.Client]:
    token = new_org_token(server.data_dir, f"portal-{uuid.uuid4().hex}")
    return Polar(token, base_url=server.url), server.client(token)


def _use(http: httpx.Client, name: str, units: int, external_customer_id: str) -> None:
    event = {
        "name": name,
        "external_customer_id": external_customer_id,
        "metadata": {"units": units},
    }
    response = http.post("/v1/events/ingest", json={"events": [event]})
    assert response.status_code == 200, response.text


def _meter(polar: Polar, name: str) -> str:
    filter_ = {
        "conjunction": "and",
        "clauses": [{"property": "name", "operator": "eq", "value": name}],
    }
    aggregation = {"func": "sum", "property": "units"}
    return polar.meters.create(name=name, filter=filter_, aggregation=aggregation).id


@pytest.fixture
def portal(server: Server) -> dict[str, Any]:
    """An organization with two meters and two customers using them; Ada has credits."""
    polar, http = _organization(server)
    ada = polar.customers.create(email="ada@example.com", external_id="ada")
    bob = polar.customers.create(email="bob@example.com", external_id="bob")
    tokens, images = _meter(polar, "tokens"), _meter(polar, "images")
    _use(http, "tokens", 30, "ada")
    _use(http, "images", 2, "ada")
    _use(http, "tokens", 500, "bob")
    grant = {"customer_id": ada.id, "meter_id": tokens, "units": 100, "external_id": "g1"}
    assert http.post("/v1/meter-credits/", json=grant).status_code == 201
    return {"polar": polar, "http": http, "ada": ada, "bob": bob, "meters": (tokens, images)}


def test_a_session_reads_its_customers_meters(server: Server, portal: dict[str, Any]) -> None:
    polar, ada = portal["polar"], portal["ada"]
    tokens, images = portal["meters"]
    session = polar.customer_sessions.create(
        external_customer_id="ada", return_url="https://example.com/account"
    )
    assert session.token.startswith("mlt_cst_")
    assert (session.customer_id, session.customer.id) == (ada.id, ada.id)
    assert session.return_url == "https://example.com/account"
    expires = datetime.fromisoformat(session.expires_at)
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)

    customer = Polar(session.token, base_url=server.url)
    listed = customer.customer_portal.customer_meters.list(sorting=["meter_name"])
    assert [
        (m.meter.name, m.consumed_units, m.credited_units, m.balance) for m in listed.items
    ] == [
        ("images", 2, 0, -2),
        ("tokens", 30, 100, 70),
    ]
    assert {m.customer_id for m in listed.items} == {ada.id}
    assert listed.pagination.total_count == 2
    by_balance = customer.customer_portal.customer_meters.list(sorting=["-balance"], limit=1)
    assert [m.meter.id for m in by_balance.items] == [tokens]
    assert by_balance.pagination.max_page == 2
    only = customer.customer_portal.customer_meters.list(meter_id=images)
    assert [m.meter_id for m in only.items] == [images]
    assert [
        m.meter.name for m in customer.customer_portal.customer_meters.list(query="TOK").items
    ] == ["tokens"]
    one = customer.customer_portal.customer_meters.get(listed.items[1].id)
    assert (one.meter.name, one.balance) == ("tokens", 70)
    # Live: new usage shows at once.
    _use(portal["http"], "tokens", 5, "ada")
    assert customer.customer_portal.customer_meters.get(one.id).balance == 65


def test_a_session_sees_nothing_of_another_customer(server: Server, portal: dict[str, Any]) -> None:
    polar = portal["polar"]
    bobs = polar.customer_meters.list(customer_id=portal["bob"].id).items
    assert [cm.consumed_units for cm in bobs] == [500]
    session = polar.customer_sessions.create(customer_id=portal["ada"].id)
    customer = Polar(session.token, base_url=server.url)
    with pytest.raises(ResourceNotFound):
        customer.customer_portal.customer_meters.get(bobs[0].id)
    listed = customer.customer_portal.customer_meters.list(meter_id=list(portal["meters"]))
    assert all(m.customer_id == portal["ada"].id for m in listed.items)
    # Another organization's session for its own "ada" sees only that organization's.
    other, _ = _organization(server)
    other.customers.create(email="ada@example.com", external_id="ada")
    theirs = Polar(
        other.customer_sessions.create(external_customer_id="ada").token, base_url=server.url
    )
    assert theirs.customer_portal.customer_meters.list().items == []


ORGANIZATION_READS = [
    "/v1/events/",
    "/v1/customers/",
    "/v1/meters/",
    "/v1/customer-meters/",
    "/v1/costs/",
    "/v1/credit-plans/",
]


def test_tokens_are_accepted_only_where_their_kind_is_expected(
    server: Server, portal: dict[str, Any]
) -> None:
    session = portal["polar"].customer_sessions.create(external_customer_id="ada")
    as_customer = server.client(session.token)
    for path in ORGANIZATION_READS:
        assert as_customer.get(path).status_code == 401, path
    ingest = as_customer.post(
        "/v1/events/ingest", json={"events": [{"name": "x", "external_customer_id": "ada"}]}
    )
    assert ingest.status_code == 401
    created = as_customer.post("/v1/customer-sessions/", json={"external_customer_id": "bob"})
    assert created.status_code == 401
    org_id = portal["polar"].meters.get(portal["meters"][0]).organization_id
    assert as_customer.get(f"/v1/organizations/{org_id}").status_code == 401
    # And an organization token is not a customer's.
    for path in ("/v1/customer-portal/meters/", f"/v1/customer-portal/meters/{uuid.uuid4()}"):
        assert portal["http"].get(path).status_code == 401, path
        assert server.client("mlt_cst_" + "x" * 43).get(path).status_code == 401, path


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"external_customer_id": "nobody"}, ["body", "external_customer_id"]),
        ({"customer_id": str(uuid.uuid4())}, ["body", "customer_id"]),
        ({}, ["body"]),
        ({"customer_id": str(uuid.uuid4()), "external_customer_id": "ada"}, ["body"]),
        ({"external_customer_id": "ada", "member_id": str(uuid.uuid4())}, ["body", "member_id"]),
        (
            {"external_customer_id": "ada", "return_url": "javascript:alert(1)"},
            ["body", "return_url"],
        ),
    ],
)
def test_bad_session_requests_are_422_naming_the_field(
    portal: dict[str, Any], body: dict[str, Any], loc: list[str]
) -> None:
    with pytest.raises(HTTPValidationError) as raised:
        portal["polar"].customer_sessions.create(**body)
    assert loc in [d.loc for d in raised.value.error.detail or []]


def test_sessions_expire(tmp_path: Path) -> None:
    with ServedCore(tmp_path / "short", "--customer-session-seconds", "1.5") as server:
        polar = Polar(new_org_token(server.data_dir, "short"), base_url=server.url)
        polar.customers.create(email="ada@example.com", external_id="ada")
        session = polar.customer_sessions.create(external_customer_id="ada")
        customer = server.client(session.token)
        assert customer.get("/v1/customer-portal/meters/").status_code == 200
        time.sleep(1.6)  # the point: the session's 1.5 s pass

        assert customer.get("/v1/customer-portal/meters/").status_code == 401


def test_a_registry_written_before_customer_sessions_works(tmp_path: Path) -> None:
    """auth.sqlite3 of the previous release (organizations and tokens only) gains the table."""
    with sqlite3.connect(tmp_path / "auth.sqlite3") as db:
        db.executescript(
            "CREATE TABLE organizations (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
            " created_at TEXT NOT NULL);"
            "CREATE TABLE tokens (id TEXT PRIMARY KEY, organization_id TEXT NOT NULL"
            " REFERENCES organizations(id), token_hash TEXT NOT NULL UNIQUE, label TEXT NOT NULL,"
            " created_at TEXT NOT NULL, revoked_at TEXT);"
            "INSERT INTO organizations VALUES ('o1', 'old', '2026-01-01T00:00:00+00:00');"
        )
    registry = TokenRegistry(tmp_path)
    try:
        org = registry.organization("old")
        assert org.id == "o1"
        token = registry.create_token(org, "t")
        assert registry.organization_id(token) == "o1"
        now = datetime.now(UTC)
        text, made = registry.create_customer_session("o1", "c1", None, now, timedelta(hours=1))
        assert registry.customer_session(text, now) == made
        assert registry.customer_session(text, now + timedelta(hours=1)) is None
        assert registry.organization_id(text) is None
    finally:
        registry.close()
