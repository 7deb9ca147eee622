"""`events.list_names`, `event_types.list` and `event_types.update` through polar-sdk: names
with their occurrences, first and last seen, source and label; labels set on a user event type
show wherever its events are read; nothing of another organization."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from polar.v2026_10 import Polar
from polar.v2026_10.errors import EventTypesUpdate404Error, HTTPValidationError

from tests.processes import Server, new_org_token

START = datetime(2026, 1, 1, tzinfo=UTC)


def _at(minutes: int) -> str:
    return (START + timedelta(minutes=minutes)).isoformat()


def _organization(server: Server) -> tuple[Polar, str]:
    token = new_org_token(server.data_dir, f"types-{uuid.uuid4().hex}")
    polar = Polar(token, base_url=server.url)
    acme = polar.customers.create(email=f"{uuid.uuid4().hex}@example.com", external_id="acme")
    events = [
        # 3 × api.call (acme by external id, then by id), 2 × llm.call (another customer).
        {"name": "api.call", "external_customer_id": "acme", "timestamp": _at(10)},
        {"name": "api.call", "external_customer_id": "acme", "timestamp": _at(30)},
        {"name": "api.call", "customer_id": acme.id, "timestamp": _at(20), "external_id": "p"},
        {
            "name": "llm.call",
            "external_customer_id": "bob",
            "timestamp": _at(5),
            "metadata": {"model": "gpt-4o"},
            "parent_id": "p",
        },
        {"name": "llm.call", "external_customer_id": "bob", "timestamp": _at(40)},
    ]
    assert polar.events.ingest(events=events).inserted == 5
    meter = polar.meters.create(
        name="Calls", filter={"conjunction": "and", "clauses": []}, aggregation={"func": "count"}
    )
    credited = httpx.post(
        f"{server.url}/v1/meter-credits/",
        headers={"Authorization": f"Bearer {token}"},
        json={"customer_id": acme.id, "meter_id": meter.id, "units": 5, "external_id": "g"},
    )
    assert credited.status_code == 201, credited.text
    return polar, acme.id


def test_names_with_occurrences_first_and_last_seen(server: Server) -> None:
    polar, acme_id = _organization(server)
    listed = polar.events.list_names(limit=100)
    assert [(n.name, n.source, n.occurrences) for n in listed.items] == [
        ("meter.credited", "system", 1),  # the latest (now), by Polar's default -last_seen
        ("llm.call", "user", 2),
        ("api.call", "user", 3),
    ]
    assert listed.pagination.total_count == 3
    by_name = {n.name: n for n in listed.items}
    assert by_name["api.call"].label == "api.call"
    assert by_name["meter.credited"].label == "Meter Credited"
    assert (by_name["api.call"].first_seen, by_name["api.call"].last_seen) == (
        _at(10).replace("+00:00", "Z"),
        _at(30).replace("+00:00", "Z"),
    )

    def names(**params: object) -> list[str]:
        found = polar.events.list_names(limit=100, **params)  # type: ignore[arg-type]
        return [n.name for n in found.items]

    assert names(source="user", sorting=["name"]) == ["api.call", "llm.call"]
    assert names(sorting=["-occurrences"]) == ["api.call", "llm.call", "meter.credited"]
    assert names(sorting=["first_seen"]) == ["llm.call", "api.call", "meter.credited"]
    assert names(query="CALL", sorting=["name"]) == ["api.call", "llm.call"]
    # A customer's events under either of its ids (and its credits).
    assert sorted(names(customer_id=acme_id)) == ["api.call", "meter.credited"]
    assert sorted(names(external_customer_id="acme")) == ["api.call", "meter.credited"]
    page = polar.events.list_names(limit=2, page=2, sorting=["name"])
    assert [n.name for n in page.items] == ["meter.credited"]
    assert (page.pagination.total_count, page.pagination.max_page) == (3, 2)
    with pytest.raises(HTTPValidationError):
        polar.events.list_names(sorting=["-label"])  # type: ignore[list-item]


def test_event_types_are_labelled_and_the_label_shows_everywhere(
    server: Server,
) -> None:
    polar, _ = _organization(server)
    types = {t.name: t for t in polar.event_types.list(limit=100).items}
    assert set(types) == {"api.call", "llm.call", "meter.credited"}
    system = types["meter.credited"]
    assert (system.id, system.created_at, system.label) == (None, None, "Meter Credited")
    llm = types["llm.call"]
    assert llm.id is not None and llm.created_at is not None and llm.modified_at is None
    assert (llm.label, llm.occurrences, llm.source) == ("llm.call", 2, "user")
    # The id is the type's: the same on every read.
    assert polar.event_types.list(query="llm").items[0].id == llm.id

    updated = polar.event_types.update(llm.id, label="  LLM call ")
    assert (updated.id, updated.name, updated.label) == (llm.id, "llm.call", "LLM call")
    assert updated.modified_at is not None and updated.created_at == llm.created_at
    assert polar.event_types.list(query="llm call").items[0].label == "LLM call"
    assert {n.name: n.label for n in polar.events.list_names().items}["llm.call"] == "LLM call"
    assert {e.label for e in polar.events.list(name="llm.call").items} == {"LLM call"}

    # A selector labels each event by its metadata, where the value is there.
    polar.event_types.update(llm.id, label="LLM call", label_property_selector="metadata.model")
    labels = sorted(e.label for e in polar.events.list(name="llm.call").items)
    assert labels == ["LLM call", "gpt-4o"]
    listed = polar.event_types.list(query="llm").items[0]
    assert listed.label_property_selector == "metadata.model"

    # Roots only, or the children of one event (named by external id here).
    roots = polar.event_types.list(root_events=True, source="user", limit=100).items
    assert {(t.name, t.occurrences) for t in roots} == {("api.call", 3), ("llm.call", 1)}
    parent = polar.events.list(name="api.call", sorting=["timestamp"]).items[1]
    children = polar.event_types.list(parent_id=parent.id).items
    assert [(t.name, t.occurrences) for t in children] == [("llm.call", 1)]
    # Labels sort as text (upper case first): "LLM call", "Meter Credited", "api.call".
    assert [t.name for t in polar.event_types.list(sorting=["label"]).items] == [
        "llm.call",
        "meter.credited",
        "api.call",
    ]


def test_bad_updates_and_other_organizations(server: Server) -> None:
    polar, _ = _organization(server)
    other, _ = _organization(server)
    theirs = next(t for t in other.event_types.list().items if t.name == "api.call")
    mine = next(t for t in polar.event_types.list().items if t.name == "api.call")
    assert theirs.id != mine.id  # same name, another organization: another type
    for unknown in (theirs.id, str(uuid.uuid4())):
        with pytest.raises(EventTypesUpdate404Error):
            polar.event_types.update(unknown, label="x")
    with pytest.raises(HTTPValidationError) as blank:
        polar.event_types.update(mine.id, label="   ")
    assert blank.value.error.detail is not None
    assert (blank.value.error.detail[0].type, blank.value.error.detail[0].loc) == (
        "value_error",
        ["body", "label"],
    )
    with pytest.raises(HTTPValidationError) as long:
        polar.event_types.update(mine.id, label="x" * 129)
    assert long.value.error.detail is not None
    assert long.value.error.detail[0].type == "string_too_long"
    other.event_types.update(theirs.id, label="Theirs")
    assert {t.label for t in polar.event_types.list().items} == {
        "api.call",
        "llm.call",
        "Meter Credited",
    }
    # Another organization's names never show.
    fresh = Polar(new_org_token(server.data_dir, f"e-{uuid.uuid4().hex}"), base_url=server.url)
    assert fresh.events.list_names().items == []
    assert fresh.event_types.list().items == []
