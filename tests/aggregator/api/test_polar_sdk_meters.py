"""Meters through the official polar-sdk client: create, get, list, update, and 422s."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from polar.base import PolarClientError
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound
from polar.v2026_10.outputs import CountAggregation, PropertyAggregation

from tests.deadline import wait_for
from tests.processes import Server, new_org_token


@pytest.fixture
def token(server: Server) -> str:
    # A fresh organization per test: meter lists are then exactly what the test made.
    return new_org_token(server.data_dir, f"meters-{uuid.uuid4().hex}")


@pytest.fixture
def polar(server: Server, token: str) -> Polar:
    return Polar(token, base_url=server.url)


LLM_FILTER = {
    "conjunction": "and",
    "clauses": [
        {"property": "name", "operator": "eq", "value": "llm.completion"},
        {
            "conjunction": "or",
            "clauses": [
                {"property": "_llm.model", "operator": "like", "value": "gpt"},
                {"property": "metadata.tier", "operator": "eq", "value": "pro"},
            ],
        },
    ],
}


def test_create_get_list_update_archive(polar: Polar) -> None:
    tokens = polar.meters.create(
        name="LLM tokens",
        filter=LLM_FILTER,
        aggregation={"func": "sum", "property": "_llm.total_tokens"},
        unit="token",
        metadata={"team": "ai"},
    )
    assert isinstance(tokens.aggregation, PropertyAggregation)
    assert tokens.aggregation.property == "_llm.total_tokens"
    assert tokens.filter.clauses[0].value == "llm.completion"  # type: ignore[union-attr]
    calls = polar.meters.create(
        name="API calls",
        filter={"conjunction": "and", "clauses": []},
        aggregation={"func": "count"},
    )
    assert isinstance(calls.aggregation, CountAggregation)

    assert polar.meters.get(tokens.id).name == "LLM tokens"
    listed = polar.meters.list()
    assert [m.name for m in listed.items] == ["API calls", "LLM tokens"]  # sorted by name
    assert polar.meters.list(query="llm").pagination.total_count == 1
    assert polar.meters.list(metadata={"team": "ai"}).items[0].id == tokens.id
    page = polar.meters.list(limit=1, page=2, sorting=["-name"])
    assert [m.name for m in page.items] == ["API calls"]
    assert page.pagination.max_page == 2

    renamed = polar.meters.update(
        tokens.id, name="Tokens", unit="custom", custom_label="token", custom_multiplier=1000
    )
    assert (renamed.name, renamed.unit, renamed.custom_label) == ("Tokens", "custom", "token")
    assert renamed.custom_multiplier == 1000
    assert renamed.modified_at is not None

    archived = polar.meters.update(calls.id, is_archived=True)
    assert archived.archived_at is not None
    assert [m.id for m in polar.meters.list(is_archived=False).items] == [tokens.id]
    assert polar.meters.update(calls.id, is_archived=False).archived_at is None


@pytest.mark.parametrize(
    ("body", "loc_start"),
    [
        (
            {
                "filter": {
                    "conjunction": "and",
                    "clauses": [{"property": "a", "operator": "in", "value": 1}],
                }
            },
            ["body", "filter"],
        ),
        (
            {
                "filter": {
                    "conjunction": "and",
                    "clauses": [
                        {"property": "a'; DROP TABLE events; --.b\"", "operator": "eq", "value": 1}
                    ],
                }
            },
            ["body", "filter"],
        ),
        ({"aggregation": {"func": "sum"}}, ["body", "aggregation", "sum", "property"]),
        (
            {"aggregation": {"func": "avg", "property": "name"}},
            ["body", "aggregation", "avg", "property"],
        ),
        ({"unit": "custom"}, ["body"]),
        # JSON path syntax, which DuckDB would read as a wildcard or refuse to bind.
        (
            {
                "filter": {
                    "conjunction": "and",
                    "clauses": [{"property": "*", "operator": "eq", "value": 1}],
                }
            },
            ["body", "filter", "clauses", 0, "FilterClause", "property"],
        ),
        (
            {"aggregation": {"func": "sum", "property": "_llm.*"}},
            ["body", "aggregation", "sum", "property"],
        ),
        (
            {"aggregation": {"func": "unique", "property": "a[0]"}},
            ["body", "aggregation", "unique", "property"],
        ),
        (
            {"aggregation": {"func": "max", "property": ".".join(["k" * 30] * 7)}},
            ["body", "aggregation", "max", "property"],
        ),
        (
            {
                "filter": {
                    "conjunction": "and",
                    "clauses": [{"property": "a", "operator": "eq", "value": 1.5}],
                }
            },
            ["body", "filter"],
        ),
    ],
)
def test_invalid_definitions_are_422_with_the_field_path(
    polar: Polar, body: dict[str, object], loc_start: list[object]
) -> None:
    meter = {
        "name": "bad meter",
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "count"},
        **body,
    }
    with pytest.raises(HTTPValidationError) as raised:
        polar.meters.create(**meter)  # type: ignore[arg-type]
    locs = [d.loc for d in raised.value.error.detail or []]
    assert any(loc[: len(loc_start)] == loc_start for loc in locs), locs


def test_a_metadata_prefix_is_stripped_as_polar_strips_it(polar: Polar) -> None:
    """`metadata.x` comes back as `x`; `metadata.name` stays (it is not the event's name)."""
    clauses = [
        {"property": "metadata.tier", "operator": "eq", "value": "pro"},
        {"property": "metadata.name", "operator": "eq", "value": "x"},
    ]
    meter = polar.meters.create(
        name="Tokens",
        filter={"conjunction": "and", "clauses": clauses},
        aggregation={"func": "sum", "property": "metadata.tokens"},
    )
    got = polar.meters.get(meter.id)
    assert [c.property for c in got.filter.clauses] == ["tier", "metadata.name"]  # type: ignore[union-attr]
    assert isinstance(got.aggregation, PropertyAggregation)
    assert got.aggregation.property == "tokens"


def test_unknown_meter_is_404(polar: Polar) -> None:
    with pytest.raises(ResourceNotFound):
        polar.meters.get(str(uuid.uuid4()))


@pytest.mark.slow
def test_events_by_meter(polar: Polar) -> None:
    tag = uuid.uuid4().hex
    meter = polar.meters.create(
        name="Tokens",
        filter=LLM_FILTER,
        aggregation={"func": "sum", "property": "_llm.total_tokens"},
    )
    llm = {"vendor": "openai", "input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    polar.events.ingest(
        events=[
            {
                "name": "llm.completion",
                "external_customer_id": tag,
                "external_id": f"{tag}-1",
                "metadata": {"_llm": {**llm, "model": "gpt-4o"}},
            },
            {
                "name": "llm.completion",
                "external_customer_id": tag,
                "external_id": f"{tag}-2",
                "metadata": {"_llm": {**llm, "model": "claude"}, "tier": "pro"},
            },
            {
                "name": "llm.completion",
                "external_customer_id": tag,
                "external_id": f"{tag}-3",
                "metadata": {"_llm": {**llm, "model": "claude"}},
            },
            # Matches the filter, but has no number to sum: not in the meter.
            {
                "name": "llm.completion",
                "external_customer_id": tag,
                "external_id": f"{tag}-4",
                "metadata": {"tier": "pro"},
            },
            {"name": "other", "external_customer_id": tag, "external_id": f"{tag}-5"},
        ]
    )
    listed = polar.events.list(meter_id=meter.id, sorting=["timestamp"], limit=100)
    ids = sorted(e.metadata.get("_llm").model for e in listed.items)  # type: ignore[union-attr]
    assert ids == ["claude", "gpt-4o"]
    with pytest.raises(PolarClientError) as raised:
        polar.events.list(meter_id=str(uuid.uuid4()))
    assert raised.value.status_code == 404


def test_quantities_through_the_sdk(polar: Polar) -> None:
    """Polar's verified example (docs/internals/decisions.md, §2.4), with meterline's semantics:
    every month the range touches is a bucket, and the total is exactly the range."""
    tag = uuid.uuid4().hex
    meter = polar.meters.create(
        name="Sum of v",
        filter={
            "conjunction": "and",
            "clauses": [{"property": "name", "operator": "eq", "value": tag}],
        },
        aggregation={"func": "sum", "property": "v"},
    )
    moments = [
        ("2024-12-20T00:00:00Z", 1000),
        ("2025-01-02T00:00:00Z", 10),
        ("2025-01-20T00:00:00Z", 20),
        ("2025-01-31T23:30:00Z", 7),
        ("2025-02-10T00:00:00Z", 30),
    ]
    polar.events.ingest(
        events=[
            {
                "name": tag,
                "external_customer_id": "c1" if i % 2 else "c2",
                "external_id": f"{tag}-{i}",
                "timestamp": ts,
                "metadata": {"v": v},
            }
            for i, (ts, v) in enumerate(moments)
        ]
    )
    window = {"start_timestamp": "2025-01-15T10:30:00Z", "end_timestamp": "2025-02-15T00:00:00Z"}
    utc = polar.meters.quantities(meter.id, interval="month", **window)
    assert [(q.timestamp, q.quantity) for q in utc.quantities] == [
        ("2025-01-01T00:00:00+00:00", 37.0),
        ("2025-02-01T00:00:00+00:00", 30.0),
    ]
    assert utc.total == 57.0
    tokyo = polar.meters.quantities(meter.id, interval="month", timezone="Asia/Tokyo", **window)
    assert [q.quantity for q in tokyo.quantities] == [30.0, 37.0]
    assert tokyo.total == 57.0
    one = polar.meters.quantities(meter.id, interval="month", external_customer_id="c1", **window)
    assert [q.quantity for q in one.quantities] == [17.0, 0.0]  # 10 and 7 are c1's
    per_customer = polar.meters.quantities(
        meter.id, interval="month", customer_aggregation_function="max", **window
    )
    assert [q.quantity for q in per_customer.quantities] == [20.0, 30.0]  # c2: 20, 30
    by_meta = polar.meters.quantities(meter.id, interval="month", metadata={"v": 20}, **window)
    assert [q.quantity for q in by_meta.quantities] == [20.0, 0.0]

    with pytest.raises(HTTPValidationError):  # hour interval over more than 7 days
        polar.meters.quantities(meter.id, interval="hour", **window)
    with pytest.raises(HTTPValidationError):
        polar.meters.quantities(meter.id, interval="day", timezone="Mars/Olympus", **window)


def test_a_new_meter_backfills_from_stored_events(polar: Polar, server: Server, token: str) -> None:
    tag = uuid.uuid4().hex
    polar.events.ingest(
        events=[
            {
                "name": tag,
                "external_customer_id": "c",
                "external_id": f"{tag}-{i}",
                "timestamp": "2025-06-01T12:00:00Z",
                "metadata": {"v": i},
            }
            for i in range(50)
        ]
    )
    meter = polar.meters.create(
        name="late meter",
        filter={
            "conjunction": "and",
            "clauses": [{"property": "name", "operator": "eq", "value": tag}],
        },
        aggregation={"func": "sum", "property": "v"},
    )
    with server.client(token) as raw:
        assert _day_total_once_backfilled(polar, raw, meter.id) == sum(range(50))
        # Redefining it rebuilds the rollups with the new aggregation.
        polar.meters.update(meter.id, aggregation={"func": "max", "property": "v"})
        assert _day_total_once_backfilled(polar, raw, meter.id) == 49


def _day_total_once_backfilled(polar: Polar, raw: httpx.Client, meter_id: str) -> float:
    """The total of 2025-06-01, read once the meter's (meterline-only) backfill field says done."""
    wait_for(
        "the meter's backfill",
        lambda: raw.get(f"/v1/meters/{meter_id}").json()["backfill"]["status"] == "done",
    )

    return polar.meters.quantities(
        meter_id,
        start_timestamp="2025-06-01T00:00:00Z",
        end_timestamp="2025-06-01T23:59:59Z",
        interval="day",
    ).total


def test_unit_rules_on_create_and_patch(polar: Polar) -> None:
    """A custom unit is created with a label; only a custom unit has a label or a multiplier.
    A patch is checked on the meter it makes (but may leave a custom unit without a label, as
    in Polar), and leaving `custom` drops the label and multiplier."""
    definition: dict[str, Any] = {
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "count"},
    }
    for extra in ({"custom_label": "request"}, {"custom_multiplier": 1000}):
        with pytest.raises(HTTPValidationError):
            polar.meters.create(name="Requests", unit="token", **definition, **extra)
    meter = polar.meters.create(name="Requests", **definition)
    assert (meter.unit, meter.custom_label, meter.custom_multiplier) == ("scalar", None, None)

    def refused(**patch: Any) -> list[list[Any]]:
        with pytest.raises(HTTPValidationError) as raised:
            polar.meters.update(meter.id, **patch)
        return [d.loc for d in raised.value.error.detail or []]

    assert refused(custom_multiplier=1000) == [["body", "custom_multiplier"]]
    custom = polar.meters.update(meter.id, unit="custom", custom_label="request")
    assert (custom.unit, custom.custom_label, custom.custom_multiplier) == (
        "custom",
        "request",
        None,
    )
    scaled = polar.meters.update(meter.id, custom_multiplier=1000, name="Requests (k)")
    assert (scaled.custom_label, scaled.custom_multiplier) == ("request", 1000)
    unlabelled = polar.meters.update(meter.id, custom_label=None)
    assert (unlabelled.unit, unlabelled.custom_label) == ("custom", None)
    tokens = polar.meters.update(meter.id, unit="token")
    assert (tokens.unit, tokens.custom_label, tokens.custom_multiplier) == ("token", None, None)
    assert refused(unit="token", custom_label="request") == [["body", "custom_label"]]
    assert polar.meters.get(meter.id).unit == "token"


def test_a_patch_to_a_custom_unit_needs_no_label_as_in_polar(server: Server, token: str) -> None:
    """Polar's MeterUpdate has no unit rule (its MeterCreate has): `{"unit": "custom"}` alone
    answers 200, and the meter is stored as Polar stores it, a custom unit without a label."""
    http = server.client(token)
    definition = {"filter": {"conjunction": "and", "clauses": []}, "aggregation": {"func": "count"}}
    created = http.post("/v1/meters/", json={"name": "Requests", **definition})
    assert created.status_code == 201, created.text
    meter_id = created.json()["id"]
    patched = http.patch(f"/v1/meters/{meter_id}", json={"unit": "custom"})
    assert patched.status_code == 200, patched.text
    stored = http.get(f"/v1/meters/{meter_id}").json()
    for found in (patched.json(), stored):
        assert (found["unit"], found["custom_label"], found["custom_multiplier"]) == (
            "custom",
            None,
            None,
        )
    # Creating one still needs the label (Polar's MeterCreate).
    unlabelled = http.post("/v1/meters/", json={"name": "More", "unit": "custom", **definition})
    assert unlabelled.status_code == 422, unlabelled.text
