"""CloudEvents over HTTP, built and encoded by the `cloudevents` package: both content types of
`POST /v1/events/ingest`, OpenMeter's `POST /api/v1/events` (204), OpenMeter's documented
example events metered, and errors located at the attribute."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from cloudevents.core.bindings import http
from cloudevents.core.v1.event import CloudEvent

from tests.openmeter_examples import API_CALL, PROMPT
from tests.processes import Server

# Each test gives the examples its own subject, so that tests share the session's server.
WINDOW = {
    "start_timestamp": "2022-12-01T00:00:00Z",
    "end_timestamp": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
    "interval": "year",
}


def _subject() -> str:
    return f"ce-{uuid.uuid4().hex[:12]}"


def _structured(**attributes: Any) -> tuple[dict[str, str], bytes]:
    data = attributes.pop("data", None)
    if isinstance(attributes.get("time"), str):  # the SDK takes a datetime
        attributes["time"] = datetime.fromisoformat(attributes["time"])
    message = http.to_structured_event(CloudEvent({"specversion": "1.0", **attributes}, data))
    return dict(message.headers), message.body


def _events(client: httpx.Client, subject: str) -> list[dict[str, Any]]:
    response = client.get("/v1/events/", params={"external_customer_id": subject})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def _sum_meter(client: httpx.Client, name: str, field: str) -> str:
    meter = {
        "name": f"{name} {field} {uuid.uuid4().hex[:8]}",
        "filter": {
            "conjunction": "and",
            "clauses": [{"property": "name", "operator": "eq", "value": name}],
        },
        "aggregation": {"func": "sum", "property": field},
    }
    created = client.post("/v1/meters/", json=meter)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _total(client: httpx.Client, meter_id: str, subject: str) -> float:
    response = client.get(
        f"/v1/meters/{meter_id}/quantities", params={**WINDOW, "external_customer_id": subject}
    )
    assert response.status_code == 200, response.text
    return float(response.json()["total"])


def test_one_event_and_a_batch_on_the_ingest_route(server: Server) -> None:
    subject = _subject()
    headers, body = _structured(
        id="e1", source="svc", type="ce.call", subject=subject, data={"n": "3"}
    )
    assert headers == {"content-type": "application/cloudevents+json"}
    with server.client() as client:
        first = client.post("/v1/events/ingest", content=body, headers=headers)
        assert first.status_code == 200, first.text
        assert first.json() == {"inserted": 1, "duplicates": 0}
        again = client.post("/v1/events/ingest", content=body, headers=headers)
        assert again.json() == {"inserted": 0, "duplicates": 1}  # the same (source, id)
        batch = [
            {"specversion": "1.0", "id": "e1", "source": "other", "type": "ce.call",
             "subject": subject, "data": {"n": 4}},
            {"specversion": "1.0", "id": "e2", "source": "svc", "type": "ce.call",
             "subject": subject, "time": "2024-05-01T10:00:00+02:00"},
        ]  # fmt: skip
        response = client.post(
            "/v1/events/ingest",
            content=orjson.dumps(batch),
            headers={"content-type": "application/cloudevents-batch+json; charset=utf-8"},
        )
        assert response.json() == {"inserted": 2, "duplicates": 0}, response.text
        events = _events(client, subject)
    assert len(events) == 3  # ("svc", "e1") once, ("other", "e1") and ("svc", "e2")
    assert sorted(orjson.dumps(e["metadata"]) for e in events) == [b'{"n":3}', b'{"n":4}', b"{}"]
    assert sum(e["timestamp"].startswith("2024-05-01T08:00:00") for e in events) == 1
    assert {e["name"] for e in events} == {"ce.call"}


def test_openmeters_path_answers_204_for_each_content_type(server: Server) -> None:
    subject = _subject()
    # Its own source: the example's (source, id) pairs are the metering test's.
    one = {**API_CALL, "subject": subject, "source": subject}
    sent = [
        ("application/cloudevents+json", one),
        ("application/cloudevents-batch+json", [{**one, "id": "00002"}, {**one, "id": "00003"}]),
        ("application/json", {**one, "id": "00004"}),
        ("application/json", [{**one, "id": "00005"}]),
    ]
    with server.client() as client:
        for content_type, body in sent:
            response = client.post(
                "/api/v1/events", content=orjson.dumps(body), headers={"content-type": content_type}
            )
            assert response.status_code == 204, (content_type, response.text)
            assert response.content == b""
        assert len(_events(client, subject)) == 5
        refused = client.post("/api/v1/events", content=b"{}", headers={"content-type": "text/csv"})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["header", "content-type"]
        anonymous = httpx.post(
            f"{server.url}/api/v1/events", json=one, headers={"content-type": "application/json"}
        )
        assert anonymous.status_code == 401


def test_openmeters_examples_are_metered(server: Server) -> None:
    subject = _subject()
    calls = [{**API_CALL, "id": f"0000{i}", "subject": subject} for i in range(1, 4)]
    calls[2]["data"] = {**API_CALL["data"], "duration_ms": "12"}
    prompts = [{**PROMPT, "subject": subject}, {**PROMPT, "id": "prompt-2", "subject": subject}]
    with server.client() as client:
        meters = (
            _sum_meter(client, "api-calls", "duration_ms"),
            _sum_meter(client, "prompt", "tokens"),
        )
        for event in [*calls, *prompts]:
            headers, body = _structured(**event)
            response = client.post("/api/v1/events", content=body, headers=headers)
            assert response.status_code == 204, response.text
        # "duration_ms": "12" was metered as the number 12.
        assert _total(client, meters[0], subject) == 1 + 1 + 12
        assert _total(client, meters[1], subject) == 200
        calls_stored = [e for e in _events(client, subject) if e["name"] == "api-calls"]
    durations = sorted(e["metadata"]["duration_ms"] for e in calls_stored)
    assert durations == [1, 1, 12]
    assert all(type(d) is int for d in durations)
    assert all(e["timestamp"].startswith("2023-01-01T00:00:00.001") for e in calls_stored)


def test_errors_are_located_at_the_attribute(server: Server) -> None:
    subject = _subject()
    good = {**API_CALL, "subject": subject}
    no_subject = {k: v for k, v in good.items() if k != "subject"}
    long_type = {**good, "id": "long", "type": "t" * 500}
    with server.client() as client:
        batch = client.post(
            "/v1/events/ingest",
            content=orjson.dumps([good, no_subject]),
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        assert batch.status_code == 422
        assert [e["loc"] for e in batch.json()["detail"]] == [["body", 1, "subject"]]
        one = client.post(
            "/api/v1/events", json=long_type, headers={"content-type": "application/json"}
        )
        assert one.status_code == 422
        assert [e["loc"] for e in one.json()["detail"]] == [["body", "type"]]
        assert _events(client, subject) == []  # all or nothing
