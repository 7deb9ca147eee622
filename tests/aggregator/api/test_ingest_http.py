"""The ingest endpoint over HTTP: limits, all-or-nothing batches, headers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from tests.processes import Server


def _count(client, external_customer_id: str) -> int:  # type: ignore[no-untyped-def]
    listed = client.get("/v1/events/", params={"external_customer_id": external_customer_id})
    return int(listed.json()["pagination"]["total_count"])


def test_body_over_10_mib_is_413_and_stores_nothing(server: Server) -> None:
    tag = uuid.uuid4().hex
    event = {"name": "big", "external_customer_id": tag, "metadata": {"pad": "x" * 500}}
    body = {"events": [event] * 22_000}  # ~12 MiB of JSON
    with server.client() as client:
        response = client.post("/v1/events/ingest", json=body)
        assert response.status_code == 413
        assert response.json()["error"] == "RequestBodyTooLarge"
        assert _count(client, tag) == 0


def test_bad_json_nan_and_future_timestamps(server: Server) -> None:
    tag = uuid.uuid4().hex
    with server.client() as client:
        for raw in (
            b"{",
            b'{"events": [{"name": "x", "external_customer_id": "a", "metadata": {"v": NaN}}]}',
            b'{"events": [{"name": "x", "external_customer_id": "a", "metadata": {"v": 1e999}}]}',
        ):
            response = client.post(
                "/v1/events/ingest", content=raw, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, raw
            assert response.json()["detail"][0]["loc"] == ["body"]
        future = (datetime.now(UTC) + timedelta(minutes=6)).isoformat()
        skewed = (datetime.now(UTC) + timedelta(minutes=4)).isoformat()
        response = client.post(
            "/v1/events/ingest",
            json={
                "events": [
                    {"name": "ok", "external_customer_id": tag, "timestamp": skewed},
                    {"name": "late", "external_customer_id": tag, "timestamp": future},
                ]
            },
        )
        assert response.status_code == 422
        assert [e["loc"] for e in response.json()["detail"]] == [["body", "events", 1, "timestamp"]]
        assert _count(client, tag) == 0  # all-or-nothing
        ok = client.post(
            "/v1/events/ingest",
            json={"events": [{"name": "ok", "external_customer_id": tag, "timestamp": skewed}]},
            headers={"Polar-Version": "2026-10"},
        )
        assert ok.json() == {"inserted": 1, "duplicates": 0}


def test_server_time_defaults_and_parent_links(server: Server) -> None:
    tag = uuid.uuid4().hex
    with server.client() as client:
        before = datetime.now(UTC)
        client.post(
            "/v1/events/ingest",
            json={
                "events": [
                    {"name": "root", "external_customer_id": tag, "external_id": f"{tag}-root"},
                    {"name": "child", "external_customer_id": tag, "parent_id": f"{tag}-root"},
                    {"name": "child", "external_customer_id": tag, "parent_id": f"{tag}-root"},
                ]
            },
        )
        items = client.get(
            "/v1/events/", params={"external_customer_id": tag, "name": "root"}
        ).json()["items"]
        assert len(items) == 1
        root = items[0]
        stamp = datetime.fromisoformat(root["timestamp"])
        assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)
        assert root["child_count"] == 2
        children = client.get("/v1/events/", params={"parent_id": root["id"]}).json()
        assert children["pagination"]["total_count"] == 2
        assert {c["parent_id"] for c in children["items"]} == {root["id"]}


def test_pagination_limits(server: Server) -> None:
    with server.client() as client:
        for params in ({"limit": 0}, {"page": 0}, {"limit": "x"}):
            response = client.get("/v1/events/", params=params)
            assert response.status_code == 422, params
            assert response.json()["detail"][0]["loc"][0] == "query"
        # As Polar: a limit over 100 is read as 100.
        assert client.get("/v1/events/", params={"limit": 101}).status_code == 200
        assert client.get("/v1/events/", params={"sorting": "name"}).status_code == 422
