"""What one organization can multiply has a limit (409 `LimitReached` past it, naming the limit
and its flag), and an organization with thousands of meters, made before any limit, neither
crashes the server nor its restart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.auth import TokenRegistry
from tests import tenants
from tests.inprocess import ServedCore
from tests.processes import MeterlineServer
from tests.tenants import many_meters

ALL = {"conjunction": "and", "clauses": []}


def _meter(name: str) -> dict[str, Any]:
    return {"name": name, "filter": ALL, "aggregation": {"func": "sum", "property": "n"}}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedCore]:
    args = (
        *("--max-meters-per-organization", "2", "--max-alerts-per-organization", "1"),
        *("--max-webhook-endpoints-per-organization", "1", "--max-streams-per-organization", "2"),
        *("--max-active-holds-per-organization", "2", "--max-top-up-rules-per-organization", "1"),
        "--allow-private-webhooks",
    )
    with ServedCore(tmp_path_factory.mktemp("limited"), *args) as core:
        yield core


def _a_meter(client: httpx.Client) -> dict[str, Any]:
    """An active meter: one the meters test left, or one made now (a test run alone)."""
    listed = client.get("/v1/meters/", params={"is_archived": False}).json()["items"]
    if listed:
        return dict(listed[0])
    made = client.post("/v1/meters/", json=_meter("a meter"))
    assert made.status_code == 201, made.text
    return dict(made.json())


def _refused(response: httpx.Response, flag: str) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == "LimitReached"
    assert flag in body["detail"]


def test_meters_past_the_limit_are_refused_and_archiving_makes_room(limited: ServedCore) -> None:
    with limited.client() as client:
        made = [client.post("/v1/meters/", json=_meter(f"meter {i}")) for i in range(2)]
        assert [r.status_code for r in made] == [201, 201]
        _refused(
            client.post("/v1/meters/", json=_meter("meter 2")), "--max-meters-per-organization"
        )
        first = made[0].json()["id"]
        assert client.patch(f"/v1/meters/{first}", json={"is_archived": True}).status_code == 200
        assert client.post("/v1/meters/", json=_meter("meter 3")).status_code == 201
        # Unarchiving would make three active meters.
        unarchive = client.patch(f"/v1/meters/{first}", json={"is_archived": False})
        _refused(unarchive, "--max-meters-per-organization")
        listed = client.get("/v1/meters/", params={"is_archived": False}).json()
        assert listed["pagination"]["total_count"] == 2


def test_alerts_and_webhook_endpoints_past_the_limit_are_refused(limited: ServedCore) -> None:
    with limited.client() as client:
        meter = _a_meter(client)
        alert = {
            "meter_id": meter["id"],
            "metric": "consumed_units",
            "operator": "gte",
            "threshold": 5,
            "external_id": "a1",
        }
        assert client.post("/v1/meter-alerts/", json=alert).status_code == 201
        _refused(
            client.post("/v1/meter-alerts/", json={**alert, "external_id": "a2"}),
            "--max-alerts-per-organization",
        )
        endpoint = {"url": "http://127.0.0.1:9/hook", "format": "raw", "events": ["meter.alert"]}
        made = client.post("/v1/webhooks/endpoints", json=endpoint)
        assert made.status_code == 201, made.text
        _refused(
            client.post("/v1/webhooks/endpoints", json=endpoint),
            "--max-webhook-endpoints-per-organization",
        )
        deleted = client.delete(f"/v1/webhooks/endpoints/{made.json()['id']}")
        assert deleted.status_code == 204
        assert client.post("/v1/webhooks/endpoints", json=endpoint).status_code == 201


def test_top_up_rules_past_the_limit_are_refused_and_a_delete_makes_room(
    limited: ServedCore,
) -> None:
    with limited.client() as client:
        meter = _a_meter(client)
        rule = {"meter_id": meter["id"], "threshold": 1, "units": 10, "max_per_period": 1}
        made = client.post("/v1/top-up-rules/", json={**rule, "period": "day"})
        assert made.status_code == 201, made.text
        _refused(
            client.post("/v1/top-up-rules/", json={**rule, "period": "week"}),
            "--max-top-up-rules-per-organization",
        )
        assert client.delete(f"/v1/top-up-rules/{made.json()['id']}").status_code == 204
        assert client.post("/v1/top-up-rules/", json={**rule, "period": "week"}).status_code == 201


def test_active_holds_past_the_limit_are_refused_and_a_release_makes_room(
    limited: ServedCore,
) -> None:
    registry = TokenRegistry(limited.data_dir)
    try:
        token = registry.create_token(registry.organization("holding"), "tests")
    finally:
        registry.close()
    with limited.client(token) as client:
        meter = client.post("/v1/meters/", json=_meter("held meter")).json()["id"]
        customer = {"email": "ada@example.com", "external_id": "ada"}
        assert client.post("/v1/customers/", json=customer).status_code == 201
        grant = {"external_customer_id": "ada", "meter_id": meter, "units": 10}
        credit = client.post("/v1/meter-credits/", json={**grant, "external_id": "grant"})
        assert credit.status_code == 201, credit.text

        def hold(key: str) -> httpx.Response:
            body = {"meter_id": meter, "external_customer_id": "ada", "units": 1}
            return client.post("/v1/meter-holds/", json={**body, "external_id": key})

        first, second = hold("h1"), hold("h2")
        assert (first.status_code, second.status_code) == (201, 201)
        _refused(hold("h3"), "--max-active-holds-per-organization")
        assert hold("h1").status_code == 200  # the same request again: its stored answer
        released = client.delete(f"/v1/meter-holds/{first.json()['id']}")
        assert released.status_code == 200, released.text
        assert hold("h3").status_code == 201


def test_streams_past_the_limit_are_refused_and_another_organization_is_not(
    limited: ServedCore,
) -> None:
    other = TokenRegistry(limited.data_dir)
    try:
        other_token = other.create_token(other.organization("other"), "tests")
    finally:
        other.close()
    with (
        limited.client() as client,
        client.stream("GET", "/v1/customer-meters/stream") as first,
        client.stream("GET", "/v1/customer-meters/stream") as second,
    ):
        assert (first.status_code, second.status_code) == (200, 200)
        _refused(client.get("/v1/customer-meters/stream"), "--max-streams-per-organization")
        with (
            limited.client(other_token) as elsewhere,
            elsewhere.stream("GET", "/v1/customer-meters/stream") as theirs,
        ):
            assert theirs.status_code == 200


@pytest.mark.processes
def test_an_organization_of_5000_meters_crashes_neither_the_server_nor_its_restart(
    tmp_path: Path,
) -> None:
    """DuckDB dies (SIGFPE) on one statement of 5,000 meters' aggregates: the flush and the
    replay of the ingest log at restart would each take the process down with it."""
    data = tmp_path / "data"
    data.mkdir()
    meters = many_meters(data, "default", 5000)
    assert len(meters) == 5000
    timestamp = datetime.now(UTC).isoformat()
    events = [
        {
            "name": "e",
            "external_customer_id": "c",
            "timestamp": timestamp,
            "metadata": {"tokens": 2},
        }
        for _ in range(100)
    ]
    today = {
        "start_timestamp": datetime.now(UTC).replace(hour=0, minute=0, second=0).isoformat(),
        "end_timestamp": datetime.now(UTC).isoformat(),
        "interval": "day",
    }
    for attempt in range(2):  # then the restart, which replays nothing lost
        # Applying 100 events to 5,000 meters takes seconds (what the meter limit prevents).
        with (
            MeterlineServer(data, "--deadline-seconds", "120") as server,
            server.client() as client,
        ):
            if attempt == 0:
                ingested = client.post("/v1/events/ingest", json={"events": events})
                assert ingested.status_code == 200, ingested.text
            for meter_id in (meters[0], meters[-1]):
                answer = client.get(f"/v1/meters/{meter_id}/quantities", params=today)
                assert answer.status_code == 200, server.output[-20:]
                assert answer.json()["total"] == 200
        assert server.exit_code == 0, server.output[-20:]


def test_a_repeatable_parameter_takes_at_most_100_values(limited: ServedCore) -> None:
    with limited.client() as client:
        for name in ("external_customer_id", "customer_id"):
            values = [f"00000000-0000-4000-8000-{i:012d}" for i in range(101)]
            answer = client.get("/v1/events/", params={name: values})
            assert answer.status_code == 422, answer.text
            error = answer.json()["detail"][0]
            assert (error["type"], error["loc"]) == ("too_long", ["query", name])
            assert client.get("/v1/events/", params={name: values[:100]}).status_code == 200


def test_a_request_over_its_rate_is_answered_from_its_headers_and_its_body_never_read(
    tmp_path: Path,
) -> None:
    """The protocol's gate: a request its tenant's limits refuse is answered once its headers
    arrive, and its connection closed; the body it declared is never waited for."""

    async def go(url: str, token: str) -> tuple[int, int, dict[str, str], bytes]:
        body = tenants.events_body("gate", 1)
        reader, writer = await tenants.connect(url)
        writer.write(tenants.ingest_request(url, token, body))
        first = await tenants.read_response(reader)
        writer.close()
        reader, writer = await tenants.connect(url)
        # 200,000 bytes declared, 10 sent: only the headers are there to judge.
        writer.write(tenants.ingest_request(url, token, body[:10], content_length=200_000))
        async with asyncio.timeout(5):
            status, headers, _ = await tenants.read_response(reader)
            rest = await reader.read()  # b"": the server closed the connection
        writer.close()
        return first[0], status, headers, rest

    with ServedCore(tmp_path, "--token-requests-per-second", "1") as core:
        assert core.token is not None
        first, status, headers, rest = asyncio.run(go(core.url, core.token))
    assert first == 200
    assert status == 429 and headers.get("connection") == "close", headers
    assert rest == b""
