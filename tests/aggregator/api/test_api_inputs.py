"""Inputs a careless client sends, each once answered 500: now a 4xx naming the parameter, or
an answer. Ids in any accepted spelling, metadata keys of any text, pages, units and timestamps
past what DuckDB or the calendar holds, deep filters, and JSON strings where numbers or booleans
belong."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.api.params import MAX_PAGE, MAX_TIMESTAMP, MIN_TIMESTAMP
from meters.filters import MAX_NESTING
from tests.inprocess import InProcessCore

WINDOW = {
    "start_timestamp": "2024-01-01T00:00:00Z",
    "end_timestamp": "2024-02-01T00:00:00Z",
    "interval": "day",
}


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("inputs")) as running:
        yield running


@pytest.fixture(scope="module")
def ids(core: InProcessCore) -> dict[str, str]:
    meter = core.request(
        "POST",
        "/v1/meters/",
        json={
            "name": "calls",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "count"},
        },
    )
    customer = core.request("POST", "/v1/customers/", json={"email": "a@b.co", "external_id": "c1"})
    assert meter.status_code == 201 and customer.status_code == 201
    return {"meter": meter.json()["id"], "customer": customer.json()["id"]}


def loc_of(response: Any) -> list[Any]:
    assert response.status_code == 422, response.text
    return list(response.json()["detail"][0]["loc"])


SPELLINGS = [
    lambda i: f"urn:uuid:{i}",
    lambda i: "{" + i + "}",
    lambda i: i.replace("-", ""),
    lambda i: i.upper(),
]


@pytest.mark.parametrize("spell", SPELLINGS, ids=["urn", "braced", "hex", "upper"])
def test_every_id_spelling_reads_as_the_canonical_id(
    core: InProcessCore, ids: dict[str, str], spell: Any
) -> None:
    meter, customer = spell(ids["meter"]), spell(ids["customer"])
    requests: list[tuple[str, str, dict[str, Any], Any]] = [
        ("GET", f"/v1/meters/{meter}", {}, None),
        ("PATCH", f"/v1/meters/{meter}", {}, {"name": "calls"}),
        ("GET", f"/v1/meters/{meter}/quantities", WINDOW, None),
        ("GET", f"/v1/meters/{ids['meter']}/quantities", {**WINDOW, "customer_id": customer}, None),
        ("GET", f"/v1/customers/{customer}", {}, None),
        ("PATCH", f"/v1/customers/{customer}", {}, {"name": "Ada"}),
        ("GET", f"/v1/customers/{customer}/state", {}, None),
        ("GET", "/v1/customer-meters/", {"customer_id": customer, "meter_id": meter}, None),
        ("GET", "/v1/customer-meters/check", {"meter_id": meter, "customer_id": customer}, None),
        ("GET", "/v1/events/", {"meter_id": meter, "customer_id": customer}, None),
        ("GET", "/v1/costs/", {**WINDOW, "customer_id": customer}, None),
        ("GET", "/v1/credit-plans/", {"meter_id": meter, "customer_id": customer}, None),
    ]
    for method, path, query, body in requests:
        response = core.request(method, path, params=query, json=body)
        assert response.status_code == 200, (method, path, query, response.text)
        if path.startswith(("/v1/meters/", "/v1/customers/")) and "id" in response.json():
            assert response.json()["id"] in (ids["meter"], ids["customer"])
    credit = {
        "meter_id": meter,
        "customer_id": customer,
        "external_id": f"spelled-{spell(ids['meter'])}",
        "units": 5,
    }
    response = core.request("POST", "/v1/meter-credits/", json=credit)
    assert response.status_code == 201, response.text
    assert response.json()["customer_meter"]["meter_id"] == ids["meter"]


@pytest.mark.parametrize(
    "bad",
    ["nope", "{" + "0" * 32 + "}", "URN:UUID:" + str(uuid.UUID(int=1)), str(uuid.UUID(int=1))[:-1]],
)
def test_a_malformed_id_is_a_422_naming_the_parameter(
    core: InProcessCore, ids: dict[str, str], bad: str
) -> None:
    for path in (
        f"/v1/meters/{bad}",
        f"/v1/customers/{bad}",
        f"/v1/customers/{bad}/state",
        f"/v1/events/{bad}",
        f"/v1/customer-meters/{bad}",
        f"/v1/credit-plans/{bad}",
    ):
        assert loc_of(core.request("GET", path)) == ["path", "id"], path
    assert loc_of(core.request("DELETE", f"/v1/credit-plans/{bad}")) == ["path", "id"]
    for path, query in (
        ("/v1/events/", {"customer_id": bad}),
        ("/v1/events/", {"meter_id": bad}),
        ("/v1/costs/", {**WINDOW, "customer_id": bad}),
        (f"/v1/meters/{ids['meter']}/quantities", {**WINDOW, "customer_id": bad}),
        ("/v1/customer-meters/", {"meter_id": bad}),
        ("/v1/customer-meters/check", {"meter_id": bad, "customer_id": ids["customer"]}),
    ):
        name = next(k for k, v in query.items() if v == bad)
        assert loc_of(core.request("GET", path, params=query)) == ["query", name], query
    # Well formed, but no such meter: not found.
    missing = core.request("GET", f"/v1/meters/{uuid.uuid4()}")
    assert missing.status_code == 404


def test_metadata_filters_take_any_key_literally(core: InProcessCore, ids: dict[str, str]) -> None:
    events = [
        {"name": "star", "external_customer_id": "c1", "metadata": {"*": "1", "a/b~": "x"}},
        {"name": "plain", "external_customer_id": "c1", "metadata": {"a": "1"}},
    ]
    assert core.request("POST", "/v1/events/ingest", json={"events": events}).status_code == 200
    core.settle()
    for key, value in (("*", "1"), ("a/b~", "x")):
        listed = core.request("GET", "/v1/events/", params={f"metadata[{key}]": value})
        assert listed.status_code == 200, listed.text
        assert [e["name"] for e in listed.json()["items"]] == ["star"]
    window = {
        "start_timestamp": "2000-01-01T00:00:00Z",
        "end_timestamp": "2009-01-01T00:00:00Z",
        "interval": "year",
    }
    quantities = core.request(
        "GET", f"/v1/meters/{ids['meter']}/quantities", params={**window, "metadata[*]": "1"}
    )
    assert quantities.status_code == 200, quantities.text
    for path in ("/v1/meters/", "/v1/customers/"):
        assert core.request("GET", path, params={"metadata[*]": "1"}).status_code == 200


@pytest.mark.parametrize(
    "path", ["/v1/events/", "/v1/meters/", "/v1/customers/", "/v1/customer-meters/"]
)
def test_a_page_past_the_bigint_offsets_is_a_422(core: InProcessCore, path: str) -> None:
    for page in (2**62, MAX_PAGE + 1, int("9" * 400)):
        assert loc_of(core.request("GET", path, params={"page": page})) == ["query", "page"]
    last = core.request("GET", path, params={"page": MAX_PAGE, "limit": 100})
    assert last.status_code == 200 and last.json()["items"] == []


def test_units_past_a_doubles_integers_are_a_422(core: InProcessCore, ids: dict[str, str]) -> None:
    query = {"meter_id": ids["meter"], "customer_id": ids["customer"]}
    for units in ("9" * 400, str(2**53)):
        response = core.request(
            "GET", "/v1/customer-meters/check", params={**query, "units": units}
        )
        assert loc_of(response) == ["query", "units"]
    fine = core.request("GET", "/v1/customer-meters/check", params={**query, "units": 2**53 - 1})
    assert fine.status_code == 200 and fine.json()["allowed"] is False


@pytest.mark.parametrize(
    ("start", "end", "bad"),
    [
        ("9999-12-31T00:00:00Z", "9999-12-31T23:00:00-05:00", "start_timestamp"),
        ("9998-06-01T00:00:00Z", "9999-12-31T23:00:00-05:00", "end_timestamp"),
        ("0001-01-01T00:00:00+05:00", "0001-01-02T00:00:00Z", "start_timestamp"),
        ("0002-01-01T03:00:00+05:00", "0002-02-01T00:00:00Z", "start_timestamp"),
    ],
)
@pytest.mark.parametrize("interval", ["year", "day", None])
def test_timestamps_outside_the_calendar_are_a_422(
    core: InProcessCore, ids: dict[str, str], start: str, end: str, bad: str, interval: str | None
) -> None:
    query = {"start_timestamp": start, "end_timestamp": end}
    if interval is not None:
        query["interval"] = interval
    assert loc_of(core.request("GET", "/v1/costs/", params=query)) == ["query", bad]
    if interval is not None:
        path = f"/v1/meters/{ids['meter']}/quantities"
        assert loc_of(core.request("GET", path, params=query)) == ["query", bad]
    else:
        assert loc_of(core.request("GET", "/v1/events/", params=query)) == ["query", bad]


@pytest.mark.parametrize("timezone", ["Pacific/Kiritimati", "Etc/GMT+12", "Asia/Kathmandu"])
def test_the_whole_timestamp_range_is_answered(
    core: InProcessCore, ids: dict[str, str], timezone: str
) -> None:
    for start, end in (
        (MIN_TIMESTAMP, MIN_TIMESTAMP.replace(year=11)),
        (MAX_TIMESTAMP.replace(year=9989), MAX_TIMESTAMP),
    ):
        query = {
            "start_timestamp": start.isoformat(),
            "end_timestamp": end.isoformat(),
            "interval": "year",
            "timezone": timezone,
        }
        quantities = core.request("GET", f"/v1/meters/{ids['meter']}/quantities", params=query)
        assert quantities.status_code == 200, quantities.text
        assert len(quantities.json()["quantities"]) in (10, 11)
        assert core.request("GET", "/v1/costs/", params=query).status_code == 200


def _nested(depth: int) -> str:
    """A filter of `depth` nested groups, as JSON text (deeper than encoders recurse)."""
    clause = '{"property": "model", "operator": "eq", "value": "x"}'
    group = f'{{"conjunction": "and", "clauses": [{clause}]}}'
    opening = f'{{"conjunction": "or", "clauses": [{clause}, ' * (depth - 1)
    return opening + group + "]}" * (depth - 1)


def test_a_filter_nests_at_most_max_nesting_groups(
    core: InProcessCore, ids: dict[str, str]
) -> None:
    before = core.table_counts()
    for depth in (MAX_NESTING + 1, 120, 400):
        meter = (
            f'{{"name": "deep", "filter": {_nested(depth)}, "aggregation": {{"func": "count"}}}}'
        )
        created = core.request("POST", "/v1/meters/", content=meter)
        assert loc_of(created) == ["body", "filter"], depth
        assert str(MAX_NESTING) in created.json()["detail"][0]["msg"]
        patch = f'{{"filter": {_nested(depth)}}}'
        patched = core.request("PATCH", f"/v1/meters/{ids['meter']}", content=patch)
        assert loc_of(patched) == ["body", "filter"]
    assert core.table_counts() == before
    meter = (
        f'{{"name": "deep", "filter": {_nested(MAX_NESTING)}, "aggregation": {{"func": "count"}}}}'
    )
    created = core.request("POST", "/v1/meters/", content=meter)
    assert created.status_code == 201, created.text
    assert core.request("GET", f"/v1/meters/{created.json()['id']}").status_code == 200
    core.settle()


def test_a_deeper_filter_stored_by_earlier_versions_still_loads(tmp_path: Path) -> None:
    """Earlier versions stored filters up to 99 groups deep: such a meter still answers."""
    with InProcessCore(tmp_path) as core:
        meter = f'{{"name": "deep", "filter": {_nested(2)}, "aggregation": {{"func": "count"}}}}'
        meter_id = core.request("POST", "/v1/meters/", content=meter).json()["id"]
        core.run(
            core.store.write(
                lambda tx: tx.con.execute(
                    "UPDATE meters SET filter = ? WHERE id = ?::UUID", [_nested(99), meter_id]
                )
            )
        )
        events = [{"name": "e", "external_customer_id": "c", "metadata": {"model": "x"}}]
        assert core.request("POST", "/v1/events/ingest", json={"events": events}).status_code == 200
        assert core.request("GET", f"/v1/meters/{meter_id}").json()["failure"] is None
        assert core.request("GET", "/v1/meters/").status_code == 200
        now = datetime.now(UTC)
        window = {
            "start_timestamp": (now - timedelta(hours=1)).isoformat(),
            "end_timestamp": (now + timedelta(hours=1)).isoformat(),
            "interval": "hour",
        }
        quantities = core.request("GET", f"/v1/meters/{meter_id}/quantities", params=window)
        assert quantities.status_code == 200 and quantities.json()["total"] == 1


def test_a_refused_value_too_deep_to_echo_is_still_a_422(core: InProcessCore) -> None:
    """422s echo the refused input; one nested deeper than the encoder goes is left out."""
    deep = "[" * 300 + "]" * 300
    for path, body, loc in (
        ("/v1/events/ingest", f'{{"events": {deep}}}', ["body", "events", 0]),
        ("/v1/customers/", f'{{"email": "d@b.co", "name": {deep}}}', ["body", "name"]),
    ):
        response = core.request("POST", path, content=body)
        assert loc_of(response)[: len(loc)] == loc, response.text
        assert response.json()["detail"][0]["input"] is None


def test_a_json_string_is_never_a_number_or_a_boolean(
    core: InProcessCore, ids: dict[str, str]
) -> None:
    credit = {"meter_id": ids["meter"], "customer_id": ids["customer"], "external_id": "strict"}
    plan = {**credit, "units": 10, "interval": "month"}
    refused: list[tuple[str, str, dict[str, Any], list[Any]]] = [
        ("PATCH", f"/v1/meters/{ids['meter']}", {"is_archived": "yes"}, ["body", "is_archived"]),
        ("PATCH", f"/v1/meters/{ids['meter']}", {"is_archived": 1}, ["body", "is_archived"]),
        (
            "PATCH",
            f"/v1/meters/{ids['meter']}",
            {"custom_multiplier": "5"},
            ["body", "custom_multiplier"],
        ),
        ("POST", "/v1/meter-credits/", {**credit, "units": "10"}, ["body", "units"]),
        ("POST", "/v1/meter-credits/", {**credit, "units": True}, ["body", "units"]),
        ("POST", "/v1/meter-credits/", {**credit, "units": 10.0}, ["body", "units"]),
        (
            "POST",
            "/v1/meter-credits/",
            {**credit, "units": 10, "rollover": "yes"},
            ["body", "rollover"],
        ),
        (
            "POST",
            "/v1/meter-credits/",
            {**credit, "units": 10, "meter_id": 5},
            ["body", "meter_id"],
        ),
        ("POST", "/v1/credit-plans/", {**plan, "units": "10"}, ["body", "units"]),
        ("POST", "/v1/credit-plans/", {**plan, "starts_at": 1700000000}, ["body", "starts_at"]),
        ("POST", "/v1/credit-plans/", {**plan, "starts_at": "1700000000"}, ["body", "starts_at"]),
        ("POST", "/v1/credit-plans/", {**plan, "rollover": "true"}, ["body", "rollover"]),
    ]
    before = core.table_counts()
    for method, path, body, loc in refused:
        response = core.request(method, path, json=body)
        assert loc_of(response)[: len(loc)] == loc, (body, response.text)
    assert core.table_counts() == before
    # Ids and timestamps are strings in JSON: still accepted as such.
    now = core.request("GET", "/v1/meters/").json()["items"][0]["created_at"]
    accepted = core.request(
        "POST",
        "/v1/credit-plans/",
        json={**plan, "starts_at": now, "meter_id": ids["meter"].upper()},
    )
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["meter_id"] == ids["meter"]


@pytest.mark.parametrize(
    ("raw", "archived"),
    [("true", True), ("YES", True), ("1", True), ("on", True), ("f", False), ("no", False)],
)
def test_query_booleans_read_as_polar_reads_them(
    core: InProcessCore, raw: str, archived: bool
) -> None:
    listed = core.request("GET", "/v1/meters/", params={"is_archived": raw})
    assert listed.status_code == 200, listed.text
    assert all((m["archived_at"] is not None) == archived for m in listed.json()["items"])


def test_a_query_boolean_polar_refuses_is_a_422(core: InProcessCore) -> None:
    for raw in ("maybe", "", "2", " true"):
        response = core.request("GET", "/v1/meters/", params={"is_archived": raw})
        assert loc_of(response) == ["query", "is_archived"]
