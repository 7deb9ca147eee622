"""`GET /v1/costs/` over real HTTP: exact decimal sums, grouping, periods, top N and 422s."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.processes import Server, new_org_token
from tests.strategies import examples

RANGE = {"start_timestamp": "2025-03-01T00:00:00Z", "end_timestamp": "2025-03-31T23:59:59Z"}
INSIDE = "2025-03-10T12:00:00Z"


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    # A fresh organization per test: its costs are exactly the events the test sends.
    with server.client(new_org_token(server.data_dir, f"costs-{uuid.uuid4().hex}")) as org:
        yield org


def event(
    amount: str | float | None,
    *,
    external: str | None = None,
    customer: str | None = None,
    name: str = "llm.call",
    at: str = INSIDE,
    llm: tuple[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if amount is not None:
        metadata["_cost"] = {"amount": amount, "currency": "usd"}
    if llm is not None:
        metadata["_llm"] = {
            "vendor": llm[0],
            "model": llm[1],
            "input_tokens": 1,
            "output_tokens": 1,
            "total_tokens": 2,
        }
    sent: dict[str, Any] = {"name": name, "timestamp": at, "metadata": metadata}
    if customer is not None:
        sent["customer_id"] = customer
    else:
        sent["external_customer_id"] = external or "someone"
    return sent


def ingest(client: httpx.Client, events: list[dict[str, Any]]) -> None:
    response = client.post("/v1/events/ingest", json={"events": events})
    assert response.status_code == 200, response.text
    assert response.json()["inserted"] == len(events)


def costs(client: httpx.Client, **query: Any) -> dict[str, Any]:
    response = client.get("/v1/costs/", params={**RANGE, **query})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def customer(client: httpx.Client, external_id: str | None) -> str:
    body = {"email": f"{uuid.uuid4().hex}@example.com", "external_id": external_id}
    response = client.post("/v1/customers/", json=body)
    assert response.status_code == 201, response.text
    customer_id: str = response.json()["id"]
    return customer_id


def canonical(amount: Decimal) -> str:
    """The documented amount form, computed independently of the server's code."""
    return format(amount.normalize(), "f") if amount else "0"


def test_sums_are_exact_decimals_in_canonical_form(client: httpx.Client) -> None:
    ingest(
        client,
        [
            event("0.000000000001"),
            event("99999.999999999999"),
            # 0.1 + 0.2 in binary floats is 0.30000000000000004.
            event("0.1"),
            event(0.2),  # a JSON number is accepted too
            event("-0.5"),
            event(None),  # no _cost: not counted
            event("12.0345", at="2025-04-01T00:00:00Z"),  # after the range
        ],
    )
    body = costs(client)
    assert body["total"] == {"amount": "99999.8", "currency": "usd", "events": 5}
    assert body["groups"] == [{"key": {}, "amount": "99999.8", "events": 5}]

    assert costs(client, name="nothing")["total"] == {"amount": "0", "currency": "usd", "events": 0}
    whole = costs(client, end_timestamp="2025-04-01T00:00:00Z")["total"]["amount"]
    assert whole == "100011.8345"
    assert costs(client, start_timestamp="2025-03-10T12:00:00.000001Z")["total"]["events"] == 0


def test_customers_group_by_entity_merging_ids_and_external_ids(client: httpx.Client) -> None:
    alice = customer(client, "alice")
    bob = customer(client, None)  # no external id: only reachable by id
    carol = customer(client, "carol")  # no events at all
    ingest(
        client,
        [
            event("1.5", customer=alice),
            event("2.25", external="alice"),
            event("4", customer=bob),
            event("0.125", external="ghost"),  # no customer has this external id
            event("0.125", external="ghost"),
        ],
    )
    body = costs(client, group_by="customer")
    assert body["total"] == {"amount": "8", "currency": "usd", "events": 5}
    assert body["groups"] == [
        {"key": {"customer_id": bob, "external_customer_id": None}, "amount": "4", "events": 1},
        {
            "key": {"customer_id": alice, "external_customer_id": "alice"},
            "amount": "3.75",
            "events": 2,
        },
        {
            "key": {"customer_id": None, "external_customer_id": "ghost"},
            "amount": "0.25",
            "events": 2,
        },
    ]

    # Either id of a customer selects all of its events.
    for query in ({"customer_id": alice}, {"external_customer_id": "alice"}):
        assert costs(client, **query)["total"]["amount"] == "3.75"
    both = costs(client, customer_id=[bob, carol], external_customer_id="ghost")
    assert both["total"] == {"amount": "4.25", "currency": "usd", "events": 3}
    assert costs(client, customer_id=carol)["total"]["events"] == 0
    malformed = client.get("/v1/costs/", params={**RANGE, "customer_id": "not-a-uuid"})
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["loc"] == ["query", "customer_id"]
    upper = costs(client, customer_id=alice.upper())
    assert upper["total"]["amount"] == "3.75"


def test_group_by_vendor_model_and_name(client: httpx.Client) -> None:
    ingest(
        client,
        [
            event("3", llm=("openai", "gpt-4o")),
            event("1", llm=("openai", "gpt-4o"), name="embed"),
            event("2", llm=("openai", "gpt-4o-mini")),
            event("5", llm=("anthropic", "claude")),
            event("0.5"),  # no _llm: null vendor and model
        ],
    )
    by_model = costs(client, group_by=["vendor", "model"])
    assert [(g["key"], g["amount"], g["events"]) for g in by_model["groups"]] == [
        ({"vendor": "anthropic", "model": "claude"}, "5", 1),
        ({"vendor": "openai", "model": "gpt-4o"}, "4", 2),
        ({"vendor": "openai", "model": "gpt-4o-mini"}, "2", 1),
        ({"vendor": None, "model": None}, "0.5", 1),
    ]
    by_vendor = costs(client, group_by="vendor")
    assert [(g["key"]["vendor"], g["amount"]) for g in by_vendor["groups"]] == [
        ("openai", "6"),
        ("anthropic", "5"),
        (None, "0.5"),
    ]
    # Repeated group_by values count once; their order does not matter.
    named = costs(client, group_by=["vendor", "name", "vendor"], name="embed")
    assert named["groups"] == [
        {"key": {"name": "embed", "vendor": "openai"}, "amount": "1", "events": 1}
    ]
    assert list(named["groups"][0]["key"]) == ["name", "vendor"]
    assert named["total"]["amount"] == "1"


def test_periods_in_a_timezone_cover_the_range_only(client: httpx.Client) -> None:
    # Asia/Kolkata is UTC+05:30: its days start at 18:30 UTC.
    ingest(
        client,
        [
            event("1", at="2025-03-01T18:00:00Z"),  # Mar 1 23:30 local, before the range
            event("2", at="2025-03-01T18:29:59.999999Z"),  # last instant of local Mar 1
            event("4", at="2025-03-01T18:30:00Z"),  # local Mar 2 00:00
            event("8", at="2025-03-02T18:29:59Z"),  # local Mar 2 23:59:59
            event("16", at="2025-03-03T10:00:00Z"),  # local Mar 3, after the range
        ],
    )
    query = {
        "start_timestamp": "2025-03-01T18:15:00Z",
        "end_timestamp": "2025-03-03T06:00:00Z",
        "interval": "day",
        "timezone": "Asia/Kolkata",
    }
    body = costs(client, **query)
    assert body["total"] == {"amount": "14", "currency": "usd", "events": 3}
    [group] = body["groups"]
    assert group["periods"] == [
        {"timestamp": "2025-03-01T00:00:00+05:30", "amount": "2", "events": 1},
        {"timestamp": "2025-03-02T00:00:00+05:30", "amount": "12", "events": 2},
        {"timestamp": "2025-03-03T00:00:00+05:30", "amount": "0", "events": 0},
    ]
    # Hours keep the half-hour offset: they start at :30 UTC.
    hourly = costs(client, **{**query, "interval": "hour", "end_timestamp": "2025-03-01T18:45:00Z"})
    assert hourly["groups"][0]["periods"] == [
        {"timestamp": "2025-03-01T23:00:00+05:30", "amount": "2", "events": 1},
        {"timestamp": "2025-03-02T00:00:00+05:30", "amount": "4", "events": 1},
    ]
    # In UTC the same events fall on other days; with a group_by, every group has the periods.
    utc = costs(client, **{**query, "timezone": "UTC", "group_by": "name"})
    assert [p["amount"] for p in utc["groups"][0]["periods"]] == ["6", "8", "0"]
    assert [p["timestamp"] for p in utc["groups"][0]["periods"]] == [
        "2025-03-01T00:00:00+00:00",
        "2025-03-02T00:00:00+00:00",
        "2025-03-03T00:00:00+00:00",
    ]


def test_top_customers_by_cost(client: httpx.Client) -> None:
    # Customer i costs i cents over i events; two customers tie at 20.
    events = [event("1", external=f"c{i:02d}") for i in range(1, 13) for _ in range(i)] + [
        event("20", external="tie-a"),
        event("20", external="tie-b"),
    ]
    ingest(client, events)
    top = costs(client, group_by="customer", limit=10)
    assert top["total"] == {"amount": str(78 + 40), "currency": "usd", "events": 80}
    ranked = [(g["key"]["external_customer_id"], g["amount"]) for g in top["groups"]]
    assert ranked == [
        ("tie-a", "20"),  # ties: by key
        ("tie-b", "20"),
        *((f"c{i:02d}", str(i)) for i in range(12, 4, -1)),
    ]
    bottom = costs(client, group_by="customer", limit=3, sort="cost")
    assert [g["key"]["external_customer_id"] for g in bottom["groups"]] == ["c01", "c02", "c03"]
    assert len(costs(client, group_by="customer")["groups"]) == 14  # default limit 100


@pytest.mark.parametrize(
    ("query", "loc", "type_"),
    [
        ({"group_by": "vendor,model"}, ["query", "group_by"], "enum"),
        ({"group_by": "customer_id"}, ["query", "group_by"], "enum"),
        ({"interval": "minute"}, ["query", "interval"], "enum"),
        ({"timezone": "Mars/Olympus"}, ["query", "timezone"], "TimeZoneName"),
        ({"interval": "hour"}, ["query", "interval"], "value_error"),  # 31 days of hours
        (
            {"start_timestamp": "2010-01-01T00:00:00Z", "interval": "month"},
            ["query", "interval"],
            "value_error",
        ),
        ({"start_timestamp": "2010-01-01T00:00:00Z"}, ["query", "end_timestamp"], "value_error"),
        ({"end_timestamp": "2025-02-01T00:00:00Z"}, ["query", "end_timestamp"], "value_error"),
        ({"start_timestamp": None}, ["query", "start_timestamp"], "missing"),
        ({"end_timestamp": "yesterday"}, ["query", "end_timestamp"], "datetime_from_date_parsing"),
        ({"limit": "0"}, ["query", "limit"], "greater_than_equal"),
        ({"limit": "1001"}, ["query", "limit"], "less_than_equal"),
        ({"limit": "ten"}, ["query", "limit"], "int_parsing"),
        ({"sort": "-amount"}, ["query", "sort"], "enum"),
        ({"customer_id": "not-a-uuid"}, ["query", "customer_id"], "uuid_parsing"),
        (
            {"end_timestamp": "9999-12-31T23:00:00-05:00"},
            ["query", "end_timestamp"],
            "datetime_range",
        ),
    ],
)
def test_bad_parameters_get_422_at_their_loc(
    client: httpx.Client, query: dict[str, Any], loc: list[str], type_: str
) -> None:
    sent = {k: v for k, v in {**RANGE, **query}.items() if v is not None}
    response = client.get("/v1/costs/", params=sent)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, type_)


def test_ranges_at_the_limits_are_accepted(client: httpx.Client) -> None:
    week = {"start_timestamp": "2025-03-01T00:00:00Z", "end_timestamp": "2025-03-08T00:00:00Z"}
    assert len(costs(client, **week, interval="hour")["groups"][0]["periods"]) == 7 * 24 + 1
    decade = {"start_timestamp": "2015-03-03T00:00:00Z", "end_timestamp": "2025-02-28T00:00:00Z"}
    assert costs(client, **decade)["total"]["events"] == 0


def test_needs_a_token(server: Server) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/v1/costs/", params=RANGE).status_code == 401
        wrong = anonymous.get("/v1/costs/", params=RANGE, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401


def test_organizations_see_only_their_costs(server: Server, client: httpx.Client) -> None:
    alice = customer(client, "shared")
    ingest(client, [event("7", customer=alice), event("1", external="shared")])
    with server.client(new_org_token(server.data_dir, f"other-{uuid.uuid4().hex}")) as other:
        ingest(other, [event("100", external="shared")])
        mine = costs(client, group_by="customer")
        theirs = costs(other, group_by="customer")
        assert costs(other, customer_id=alice)["total"]["events"] == 0
    assert mine["groups"] == [
        {
            "key": {"customer_id": alice, "external_customer_id": "shared"},
            "amount": "8",
            "events": 2,
        }
    ]
    assert theirs["groups"] == [
        {
            "key": {"customer_id": None, "external_customer_id": "shared"},
            "amount": "100",
            "events": 1,
        }
    ]


# Any amount ingest accepts: at most 5 whole digits and 12 decimals, in cents.
amounts = st.decimals(
    min_value=Decimal("-99999.999999999999"),
    max_value=Decimal("99999.999999999999"),
    places=12,
    allow_nan=False,
    allow_infinity=False,
) | st.sampled_from([Decimal("0.000000000001"), Decimal("99999.999999999999"), Decimal("0.1")])


@settings(
    max_examples=examples(20),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.booleans(), amounts),
        max_size=25,
    )
)
@pytest.mark.slow
def test_per_customer_totals_equal_a_decimal_fold(
    server: Server, data: list[tuple[str, bool, Decimal]]
) -> None:
    with server.client(new_org_token(server.data_dir, f"fold-{uuid.uuid4().hex}")) as org:
        # a and b are customers (b without an external id), c and d only external ids.
        ids = {"a": customer(org, "a"), "b": customer(org, None)}
        sent = []
        expected: dict[tuple[str | None, str | None], Decimal] = defaultdict(Decimal)
        for who, by_id, amount in data:
            text = format(amount, "f")
            if who in ids and (by_id or who == "b"):
                sent.append(event(text, customer=ids[who]))
            else:
                sent.append(event(text, external=who))
            key = (ids.get(who), None if who == "b" else who)
            expected[key] += amount
        if sent:
            ingest(org, sent)
        body = costs(org, group_by="customer", limit=1000)
    got = {
        (g["key"]["customer_id"], g["key"]["external_customer_id"]): g["amount"]
        for g in body["groups"]
    }
    assert got == {key: canonical(total) for key, total in expected.items()}
    assert body["total"]["amount"] == canonical(sum(expected.values(), Decimal(0)))
    assert body["total"]["events"] == len(data)
    amounts_in_order = [Decimal(g["amount"]) for g in body["groups"]]
    assert amounts_in_order == sorted(amounts_in_order, reverse=True)
