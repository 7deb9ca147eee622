"""Holds through a real `meterline up`: decided in the writer (concurrent holds never reserve
more than the balance), settled by the usage event with the same external_id, customer and
meter in that event's transaction, released, expired; the balance check and customer meters
count them."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from aggregator.store.engine.migrations import migrate
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline, send_until_accepted
from tests.processes import MeterlineServer, Server, new_org_token


class Org:
    """A fresh organization with a sum meter `tokens`, a count meter `calls`, an avg meter
    and a customer `ada` credited 10 units on each of the first two."""

    def __init__(self, server: Server, token: str | None = None) -> None:
        self.token = token or new_org_token(server.data_dir, f"holds-{uuid.uuid4().hex}")
        self.http = server.client(self.token)
        self.url = server.url
        self.tokens = self._meter("tokens", {"func": "sum", "property": "tokens"}, "use")
        self.calls = self._meter("calls", {"func": "count"}, "call")
        self.avg = self._meter("avg", {"func": "avg", "property": "tokens"}, "use")
        created = self.http.post(
            "/v1/customers/", json={"email": "ada@example.com", "external_id": "ada"}
        )
        assert created.status_code == 201, created.text
        self.ada = created.json()["id"]
        for meter in (self.tokens, self.calls):
            grant = {"external_customer_id": "ada", "meter_id": meter, "units": 10}
            answer = self.http.post("/v1/meter-credits/", json={**grant, "external_id": meter})
            assert answer.status_code == 201, answer.text

    def _meter(self, name: str, aggregation: dict[str, Any], event: str) -> str:
        clause = {"property": "name", "operator": "eq", "value": event}
        body = {"name": name, "filter": {"conjunction": "and", "clauses": [clause]}}
        created = self.http.post("/v1/meters/", json={**body, "aggregation": aggregation})
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def hold(self, meter: str, units: float, key: str, **extra: Any) -> httpx.Response:
        body = {"meter_id": meter, "external_customer_id": "ada", "units": units}
        return self.http.post("/v1/meter-holds/", json={**body, "external_id": key, **extra})

    def customer_meter(self, meter: str) -> dict[str, Any]:
        found = self.http.get(
            "/v1/customer-meters/", params={"customer_id": self.ada, "meter_id": meter}
        ).json()["items"]
        assert len(found) == 1
        return dict(found[0])

    def ingest(self, *events: dict[str, Any]) -> None:
        send_until_accepted(self.http, list(events))  # a 503 is retried, as clients do


@pytest.fixture
def org(server: Server) -> Org:
    return Org(server)


def test_fifty_concurrent_holds_of_one_unit_against_ten(org: Org) -> None:
    async def hold_all() -> list[int]:
        headers = {"Authorization": f"Bearer {org.token}"}
        async with httpx.AsyncClient(base_url=org.url, headers=headers, timeout=30) as client:
            body = {"meter_id": org.tokens, "customer_id": org.ada, "units": 1}
            answers = await asyncio.gather(
                *(
                    client.post("/v1/meter-holds/", json={**body, "external_id": f"h{i}"})
                    for i in range(50)
                )
            )
        return [a.status_code for a in answers]

    codes = asyncio.run(hold_all())
    assert sorted(codes) == [201] * 10 + [409] * 40
    cm = org.customer_meter(org.tokens)
    assert (cm["balance"], cm["held_units"], cm["available"]) == (10, 10, 0)
    listed = org.http.get("/v1/meter-holds/", params={"active": "true", "limit": 100}).json()
    assert listed["pagination"]["total_count"] == 10


def test_refused_hold_names_what_is_available(org: Org) -> None:
    assert org.hold(org.tokens, 4, "a").status_code == 201
    refused = org.hold(org.tokens, 7, "b")
    assert refused.status_code == 409
    assert refused.json()["error"] == "insufficient_balance"
    assert "6 units available" in refused.json()["detail"]


def test_the_usage_event_settles_its_hold_in_its_transaction(org: Org) -> None:
    created = org.hold(org.tokens, 8, "req-1")
    assert created.status_code == 201, created.text
    hold = created.json()
    assert hold["status"] == "active"
    assert (hold["customer_meter"]["held_units"], hold["customer_meter"]["available"]) == (8, 2)
    # Another customer's event, another meter's event, an event without the key: no settling.
    org.ingest(
        {
            "name": "use",
            "external_customer_id": "bob",
            "external_id": "x-1",
            "metadata": {"tokens": 1},
        },
        {"name": "use", "external_customer_id": "ada", "metadata": {"tokens": 1}},
    )
    assert org.http.get(f"/v1/meter-holds/{hold['id']}").json()["status"] == "active"
    org.ingest(
        {
            "name": "use",
            "external_customer_id": "ada",
            "external_id": "req-1",
            "metadata": {"tokens": 5},
        }
    )
    settled = org.http.get(f"/v1/meter-holds/{hold['id']}").json()
    assert settled["status"] == "settled" and settled["ended_at"] is not None
    cm = settled["customer_meter"]
    # The event's consumption (5, and 1 before) replaces the hold (8).
    assert (cm["consumed_units"], cm["held_units"], cm["balance"], cm["available"]) == (6, 0, 4, 4)


def test_an_event_not_in_the_meter_does_not_settle(org: Org) -> None:
    hold = org.hold(org.tokens, 3, "k").json()
    org.ingest({"name": "call", "customer_id": org.ada, "external_id": "k"})  # another meter
    assert org.http.get(f"/v1/meter-holds/{hold['id']}").json()["status"] == "active"
    calls = org.customer_meter(org.calls)
    assert (calls["consumed_units"], calls["held_units"]) == (1, 0)
    other = org.hold(org.tokens, 1, "no-number").json()
    org.ingest(
        {"name": "use", "customer_id": org.ada, "external_id": "no-number"}
    )  # nothing to sum
    assert org.http.get(f"/v1/meter-holds/{other['id']}").json()["status"] == "active"


def test_release_and_replays(org: Org) -> None:
    first = org.hold(org.calls, 6, "r")
    assert first.status_code == 201
    again = org.hold(org.calls, 6, "r")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert org.hold(org.calls, 5, "r").status_code == 409  # the key, another request
    hold_id = first.json()["id"]
    released = org.http.delete(f"/v1/meter-holds/{hold_id}")
    assert released.status_code == 200
    assert released.json()["status"] == "released"
    assert released.json()["customer_meter"]["available"] == 10
    assert org.http.delete(f"/v1/meter-holds/{hold_id}").json()["status"] == "released"
    # A released hold is never settled by its event.
    org.ingest({"name": "call", "customer_id": org.ada, "external_id": "r"})
    assert org.http.get(f"/v1/meter-holds/{hold_id}").json()["status"] == "released"
    assert org.http.get(f"/v1/meter-holds/{uuid.uuid4()}").status_code == 404


def test_a_holds_answer_is_what_reading_it_says(org: Org) -> None:
    """Made and released from what the writer had in hand (no read after the write), a hold's
    answer is the one a read of it gives right after: the customer (its first event among the
    events applied and not yet stored), the meter, the customer meter with what holds reserve."""
    org.ingest({"name": "use", "external_customer_id": "ada", "metadata": {"tokens": 2}})
    assert org.hold(org.tokens, 1, "before").status_code == 201
    made = org.hold(org.tokens, 3, "answer")
    assert made.status_code == 201, made.text
    answer = made.json()
    assert answer["customer_meter"]["customer"]["first_user_event_at"] is not None
    assert answer["customer_meter"]["held_units"] == 4
    assert org.http.get(f"/v1/meter-holds/{answer['id']}").json() == answer
    released = org.http.delete(f"/v1/meter-holds/{answer['id']}").json()
    assert released["customer_meter"]["held_units"] == 1
    assert org.http.get(f"/v1/meter-holds/{answer['id']}").json() == released


def test_deleting_a_customer_releases_its_holds(org: Org) -> None:
    hold = org.hold(org.tokens, 2, "gone").json()
    assert org.http.delete(f"/v1/customers/{org.ada}").status_code == 204
    listed = org.http.get("/v1/meter-holds/", params={"active": "true"}).json()
    assert listed["pagination"]["total_count"] == 0
    assert org.http.delete(f"/v1/meter-holds/{hold['id']}").status_code == 404
    assert org.http.get(f"/v1/meter-holds/{hold['id']}").status_code == 404


def test_holds_expire_and_the_check_counts_active_ones(org: Org) -> None:
    check = {"meter_id": org.tokens, "external_customer_id": "ada", "units": 5}
    assert org.http.get("/v1/customer-meters/check", params=check).json()["allowed"] is True
    assert org.hold(org.tokens, 9, "short", expires_in_seconds=1).status_code == 201
    answer = org.http.get("/v1/customer-meters/check", params=check).json()
    assert (answer["allowed"], answer["held_units"], answer["balance_after"]) == (False, 9, -4)
    time.sleep(1.2)  # the point: the hold's second passes

    answer = org.http.get("/v1/customer-meters/check", params=check).json()
    assert (answer["allowed"], answer["held_units"]) == (True, 0)
    listed = org.http.get("/v1/meter-holds/", params={"customer_id": org.ada}).json()
    assert [h["status"] for h in listed["items"]] == ["expired"]
    # Expired: its event no longer settles it, and it reserves nothing.
    org.ingest(
        {"name": "use", "customer_id": org.ada, "external_id": "short", "metadata": {"tokens": 1}}
    )
    assert (
        org.http.get("/v1/meter-holds/", params={"customer_id": org.ada}).json()["items"][0][
            "status"
        ]
        == "expired"
    )


@pytest.mark.parametrize(
    ("change", "loc", "type_"),
    [
        ({"units": 0}, ["body", "units"], "greater_than"),
        ({"units": "1"}, ["body", "units"], "float_type"),
        ({"expires_in_seconds": 86_401}, ["body", "expires_in_seconds"], "less_than_equal"),
        ({"external_id": ""}, ["body", "external_id"], "string_too_short"),
        ({"meter_id": str(uuid.uuid4())}, ["body", "meter_id"], "meter_not_found"),
        (
            {"external_customer_id": "nobody"},
            ["body", "external_customer_id"],
            "customer_not_found",
        ),
    ],
)
def test_bad_holds_are_422_naming_the_field(
    org: Org, change: dict[str, Any], loc: list[str], type_: str
) -> None:
    body = {"meter_id": org.tokens, "external_customer_id": "ada", "units": 1, "external_id": "b"}
    refused = org.http.post("/v1/meter-holds/", json={**body, **change})
    assert refused.status_code == 422, refused.text
    (error,) = refused.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, type_)


def test_a_hold_on_an_avg_meter_is_422(org: Org) -> None:
    refused = org.hold(org.avg, 1, "avg")
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "meter_id"]


def test_another_organization_sees_no_hold(org: Org, server: Server) -> None:
    hold = org.hold(org.tokens, 1, "mine").json()
    other = server.client(new_org_token(server.data_dir, f"other-{uuid.uuid4().hex}"))
    assert other.get(f"/v1/meter-holds/{hold['id']}").status_code == 404
    assert other.delete(f"/v1/meter-holds/{hold['id']}").status_code == 404
    assert other.get("/v1/meter-holds/").json()["items"] == []


@pytest.mark.processes
def test_kafka_mode_the_core_settles_the_hold(tmp_path: Path) -> None:
    """The usage event goes through an edge and the topic; the core's consumer settles."""
    with Pipeline(tmp_path) as pipeline:
        assert pipeline.core is not None
        org = Org(pipeline.core, pipeline.token())
        hold = org.hold(org.tokens, 7, "kafka-1").json()
        assert hold["customer_meter"]["available"] == 3
        with pipeline.edges[0].client(org.token) as edge:
            event = {"name": "use", "external_customer_id": "ada", "external_id": "kafka-1"}
            sent = edge.post(
                "/v1/events/ingest", json={"events": [{**event, "metadata": {"tokens": 2}}]}
            )
            assert sent.status_code == 200, sent.text
        pipeline.wait_for_events(3)  # the two credits' system events, and the usage
        settled = org.http.get(f"/v1/meter-holds/{hold['id']}").json()
        assert settled["status"] == "settled"
        assert settled["customer_meter"]["available"] == 8


@pytest.mark.processes
def test_a_hold_survives_kill_9(tmp_path: Path) -> None:
    with MeterlineServer(tmp_path) as server:
        org = Org(server)
        hold = org.hold(org.tokens, 6, "durable").json()
        server.kill()
        server.start()
        org.http = server.client(org.token)
        assert org.http.get(f"/v1/meter-holds/{hold['id']}").json()["status"] == "active"
        assert org.hold(org.tokens, 5, "more").status_code == 409  # 4 left
        # The keys of active holds were read back at start: its event settles it.
        org.ingest(
            {
                "name": "use",
                "external_customer_id": "ada",
                "external_id": "durable",
                "metadata": {"tokens": 1},
            }
        )
        assert org.http.get(f"/v1/meter-holds/{hold['id']}").json()["status"] == "settled"


def test_a_data_dir_of_the_previous_main_takes_holds(tmp_path: Path) -> None:
    """Step 15 (the previous main's schema): opened, migrated, and holding."""
    con = duckdb.connect(str(tmp_path / "meterline.duckdb"))
    assert migrate(con, until=15) == 15
    con.close()
    with ServedCore(tmp_path) as server:
        org = Org(server)
        assert org.hold(org.calls, 2, "after-migration").status_code == 201
        assert org.customer_meter(org.calls)["held_units"] == 2
