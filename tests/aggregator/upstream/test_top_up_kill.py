"""`meterline up` killed with kill -9 while customers' events stream in, then restarted (its
ingest log replayed a request per transaction where the killed core applied many in one) and
fed more: the top-ups it made, and the `customer_meter.topped_up` webhook events the receiver
got, are the model's for the events it holds, each top-up under exactly one webhook-id."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.aggregator.upstream.webhook_receiver import Receiver
from tests.deadline import wait_for
from tests.processes import MeterlineServer, edge_token, new_org_token

pytestmark = pytest.mark.processes

CUSTOMERS = 8
EVENTS = 12  # per customer and round
# Every customer's: below 3 after an event, 10 credited, at most 3 times a month.
RULE = {"threshold": 3, "units": 10, "max_per_period": 3, "period": "month"}
# Stored only this long after applying: the kill comes before, so a restart applies again.
CORE_ARGS = ("--allow-private-webhooks", "--flush-seconds", "30")


def model(events: int) -> list[int]:
    """The top-ups' numbers for a customer whose count meter (no credits) took `events`."""
    credited, made = 0, []
    for consumed in range(1, events + 1):
        if credited - consumed < RULE["threshold"] and len(made) < RULE["max_per_period"]:
            credited += RULE["units"]
            made.append(len(made) + 1)
    return made


async def _stream(url: str, token: str, kill: Callable[[], None] | None = None) -> None:
    """`EVENTS` per customer, one a request, many in flight; `kill` once half are answered
    (the rest then fail, or were applied before the kill: the model counts what is held)."""
    answered = 0
    limit = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:

        async def one(customer: int) -> None:
            nonlocal answered
            event = {"name": "call", "external_customer_id": f"c{customer}"}
            async with limit:
                try:
                    sent = await client.post("/v1/events/ingest", json={"events": [event]})
                except httpx.TransportError:
                    assert kill is not None, "no kill, yet the server went away"
                    return
            assert sent.status_code == 200, sent.text
            answered += 1
            if kill is not None and answered == CUSTOMERS * EVENTS // 2:
                kill()

        await asyncio.gather(*(one(c) for _ in range(EVENTS) for c in range(CUSTOMERS)))


def test_top_ups_and_their_webhooks_are_the_models_across_kill_9(tmp_path: Path) -> None:
    with Receiver() as receiver, MeterlineServer(tmp_path, *CORE_ARGS) as server:
        token = edge_token(server, new_org_token(tmp_path, f"top-up-kill-{uuid.uuid4().hex}"))
        with server.client(token) as http:
            meter = http.post(
                "/v1/meters/",
                json={
                    "name": "calls",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "count"},
                },
            ).json()["id"]
            for c in range(CUSTOMERS):
                customer = {"email": f"c{c}@example.com", "external_id": f"c{c}"}
                assert http.post("/v1/customers/", json=customer).status_code == 201
            hook = {"url": receiver.url, "format": "raw", "events": ["customer_meter.topped_up"]}
            assert http.post("/v1/webhooks/endpoints", json=hook).status_code == 201
            made = http.post("/v1/top-up-rules/", json={"meter_id": meter, **RULE})
            assert made.status_code == 201, made.text
        asyncio.run(_stream(server.url, token, kill=server.kill))
        server.start()  # replays the ingest log: what was applied but not stored, again
        asyncio.run(_stream(server.url, token))

        with server.client(token) as http:
            held = {
                m["customer_id"]: int(m["consumed_units"])
                for m in http.get(
                    "/v1/customer-meters/", params={"meter_id": meter, "limit": 100}
                ).json()["items"]
            }
            listed = http.get("/v1/top-ups/", params={"limit": 100}).json()["items"]
        expected = {c: model(n) for c, n in held.items()}
        total = sum(map(len, expected.values()))
        assert len(held) == CUSTOMERS and total > 2 * CUSTOMERS  # some after the restart

        def ids_per_top_up() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for r in list(receiver.received):
                top_up = json.loads(r.body)["data"]["top_up"]["id"]
                found.setdefault(top_up, set()).add(r.headers["webhook-id"])
            return found

        wait_for("a delivery of every top-up", lambda: len(ids_per_top_up()) >= total)
        delivered = ids_per_top_up()
    per_customer: dict[str, list[int]] = {}
    for t in listed:
        per_customer.setdefault(t["customer_id"], []).append(t["number"])
    assert {c: sorted(n) for c, n in per_customer.items()} == expected
    assert set(delivered) == {t["id"] for t in listed}
    assert all(len(ids) == 1 for ids in delivered.values()), "a top-up under two webhook-ids"
