"""The official polar-sdk client against a running meterline, unchanged."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound
from polar.v2026_10.outputs import CustomerIndividual, UserEvent

from tests.processes import Server


@pytest.fixture
def polar(server: Server) -> Polar:
    assert server.token
    return Polar(server.token, base_url=server.url)


def _ts(minutes_ago: int) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()


def test_ingest_counts_inserted_and_duplicates(polar: Polar) -> None:
    tag = uuid.uuid4().hex
    events = [
        {"name": "api_call", "external_customer_id": f"c-{tag}", "external_id": f"{tag}-{i}"}
        for i in range(3)
    ]
    first = polar.events.ingest(events=events)
    assert (first.inserted, first.duplicates) == (3, 0)

    # A retry of the same batch plus one new event, with a repeat inside the batch.
    again = polar.events.ingest(
        events=[
            *events,
            {"name": "api_call", "external_customer_id": f"c-{tag}", "external_id": f"{tag}-new"},
            {"name": "api_call", "external_customer_id": f"c-{tag}", "external_id": f"{tag}-new"},
        ]
    )
    assert (again.inserted, again.duplicates) == (1, 4)


def test_ingest_validation_error_is_loaded_by_the_sdk(polar: Polar) -> None:
    with pytest.raises(HTTPValidationError) as raised:
        polar.events.ingest(
            events=[
                {"name": "ok", "external_customer_id": "x"},
                {"name": "bad", "external_customer_id": "x", "metadata": {"_cost": {"amount": 1}}},
            ]
        )
    detail = raised.value.error.detail
    assert detail is not None
    assert [d.loc for d in detail] == [["body", "events", 1, "metadata", "_cost", "currency"]]


@pytest.mark.slow
def test_events_list_and_get_round_trip(polar: Polar) -> None:
    tag = uuid.uuid4().hex
    customer = f"cust-{tag}"
    timestamps = [_ts(30), _ts(20), _ts(10)]
    polar.events.ingest(
        events=[
            {
                "name": "llm.completion",
                "external_customer_id": customer,
                "external_id": f"{tag}-{i}",
                "timestamp": ts,
                "metadata": {
                    "_llm": {
                        "vendor": "openai",
                        "model": "gpt-4o-mini",
                        "input_tokens": 10 * (i + 1),
                        "output_tokens": 5,
                        "total_tokens": 10 * (i + 1) + 5,
                    },
                    "_cost": {"amount": "0.015", "currency": "usd"},
                    "route": "/chat",
                    "step": i,
                },
            }
            for i, ts in enumerate(timestamps)
        ]
    )
    listed = polar.events.list(external_customer_id=customer, limit=2)
    assert listed.pagination.total_count == 3  # type: ignore[union-attr]
    assert listed.pagination.max_page == 2  # type: ignore[union-attr]
    items = listed.items
    assert all(isinstance(e, UserEvent) for e in items)
    # Newest first by default.
    assert [e.metadata["step"] for e in items] == [2, 1]  # type: ignore[union-attr]
    newest = items[0]
    assert isinstance(newest, UserEvent)
    assert newest.metadata["_cost"].amount == "0.015"
    assert newest.metadata["_llm"].total_tokens == 35

    page2 = polar.events.list(external_customer_id=customer, limit=2, page=2)
    assert [e.metadata["step"] for e in page2.items] == [0]  # type: ignore[union-attr]

    oldest_first = polar.events.list(external_customer_id=customer, sorting=["timestamp"])
    assert [e.metadata["step"] for e in oldest_first.items] == [0, 1, 2]  # type: ignore[union-attr]

    fetched = polar.events.get(newest.id)
    assert isinstance(fetched, UserEvent)
    assert fetched.id == newest.id
    assert fetched.external_customer_id == customer

    by_meta = polar.events.list(external_customer_id=customer, metadata={"step": 1})
    assert [e.metadata["step"] for e in by_meta.items] == [1]  # type: ignore[union-attr]
    by_name = polar.events.list(name="llm.completion", external_customer_id=customer)
    assert by_name.pagination.total_count == 3  # type: ignore[union-attr]
    window = polar.events.list(
        external_customer_id=customer, start_timestamp=_ts(25), end_timestamp=_ts(15)
    )
    assert [e.metadata["step"] for e in window.items] == [1]  # type: ignore[union-attr]


def test_unknown_event_is_resource_not_found(polar: Polar) -> None:
    with pytest.raises(ResourceNotFound):
        polar.events.get(str(uuid.uuid4()))


def test_customers_create_get_external_list_update(polar: Polar) -> None:
    tag = uuid.uuid4().hex
    external = f"ext-{tag}"
    # Events sent before the customer exists belong to it once it is created.
    polar.events.ingest(
        events=[{"name": "early", "external_customer_id": external, "timestamp": _ts(60)}]
    )
    created = polar.customers.create(
        email=f"{tag}@example.com", name="Ada", external_id=external, metadata={"plan": "pro"}
    )
    assert isinstance(created, CustomerIndividual)
    assert created.external_id == external
    assert created.first_user_event_at is not None

    assert polar.customers.get(created.id).id == created.id
    assert polar.customers.get_external(external).id == created.id

    listed = polar.customers.list(email=f"{tag}@example.com")
    assert [c.id for c in listed.items] == [created.id]
    assert polar.customers.list(metadata={"plan": "pro"}, query=tag).pagination.total_count == 1

    updated = polar.customers.update(created.id, name="Ada Lovelace", metadata={"plan": "team"})
    assert updated.name == "Ada Lovelace"
    assert updated.metadata == {"plan": "team"}
    assert updated.modified_at is not None

    # The early event is listed under the customer's own id, with the customer attached.
    events = polar.events.list(customer_id=created.id)
    assert events.pagination.total_count == 1  # type: ignore[union-attr]
    event = events.items[0]
    assert isinstance(event, UserEvent)
    assert event.customer is not None
    assert event.customer.id == created.id

    # Events by customer_id require an existing customer.
    ok = polar.events.ingest(events=[{"name": "later", "customer_id": created.id}])
    assert ok.inserted == 1
    with pytest.raises(HTTPValidationError) as raised:
        polar.events.ingest(events=[{"name": "x", "customer_id": str(uuid.uuid4())}])
    assert raised.value.error.detail is not None
    assert raised.value.error.detail[0].loc == ["body", "events", 0, "customer_id"]


def test_an_empty_external_id_is_none_as_in_polar(polar: Polar) -> None:
    tag = uuid.uuid4().hex
    created = polar.customers.create(email=f"{tag}@example.com", external_id="")
    assert created.external_id is None
    updated = polar.customers.update(created.id, external_id="")
    assert updated.external_id is None
    # Still settable once, as a customer created without one.
    assert polar.customers.update(created.id, external_id=tag).external_id == tag


def test_customer_uniqueness_and_not_found(polar: Polar) -> None:
    tag = uuid.uuid4().hex
    polar.customers.create(email=f"{tag}@example.com", external_id=tag)
    with pytest.raises(HTTPValidationError) as raised:
        polar.customers.create(email=f"{tag.upper()}@EXAMPLE.com", external_id=tag)
    locs = [d.loc for d in raised.value.error.detail or []]
    assert locs == [["body", "email"], ["body", "external_id"]]
    with pytest.raises(ResourceNotFound):
        polar.customers.get(str(uuid.uuid4()))
    with pytest.raises(ResourceNotFound):
        polar.customers.get_external(f"missing-{tag}")
