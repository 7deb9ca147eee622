"""A core killed with kill -9 after its alerts and top-ups went out applies the same events
again when it restarts, grouped otherwise: the embedded core replays its ingest log a request
per transaction where the killed one had applied many requests in one; a Kafka core reads its
partitions again from the stored offsets, in batches of other sizes. Every crossing and every
top-up still reaches the receiver under exactly one webhook-id (what receivers dedupe by, as
Standard Webhooks tells them to), and the top-ups are the ones the events call for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.aggregator.upstream.webhook_receiver import Receiver
from tests.deadline import wait_for
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer, Server, edge_token, new_org_token

pytestmark = pytest.mark.processes
PRIVATE = "--allow-private-webhooks"

CUSTOMERS = 20
TOKENS = 3  # per event
THRESHOLDS = (10, 25)  # crossed at each customer's 4th event, then at its 9th
# A top-up rule for every customer: from a balance of 0, 20 units at its 1st event (balance -3)
# and at its 6th (2 left); so two top-ups a customer, one on either side of the kill.
TOP_UP = {"threshold": 5, "units": 20, "max_per_period": 10, "period": "day"}
# The core stores applied events once the oldest has waited this long (`--flush-seconds`): the
# first round must be applied and killed before, or nothing is left to apply again. Longer
# than the default, so a loaded machine still delivers some alerts within it.
FLUSH_SECONDS = 30.0
CORE_ARGS = (PRIVATE, "--flush-seconds", str(FLUSH_SECONDS))


class Running:
    """A core to set up and read from, where to send events, and how to kill and restart."""

    def __init__(
        self, core: Callable[[], Server], ingest: Callable[[], Server], restart: Callable[[], None]
    ) -> None:
        self.core = core
        self.ingest = ingest
        self.restart = restart


@contextlib.contextmanager
def _embedded(data_dir: Path) -> Iterator[Running]:
    with MeterlineServer(data_dir, *CORE_ARGS) as server:

        def restart() -> None:
            server.kill()
            server.start()  # replays the ingest log: the same requests, one per transaction

        yield Running(lambda: server, lambda: server, restart)


@contextlib.contextmanager
def _kafka(data_dir: Path) -> Iterator[Running]:
    with Pipeline(data_dir, processes=True, core_args=CORE_ARGS) as pipeline:

        def core() -> Server:
            assert pipeline.core is not None
            return pipeline.core

        # Reads the partitions again from the offsets stored with the events.
        yield Running(core, lambda: pipeline.edges[0], pipeline.restart_core)


async def _use(url: str, token: str, events: int, concurrency: int = 16) -> None:
    """`events` events per customer, one a request, many requests in flight at once (so the
    core applies several in one transaction)."""
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:

        async def one(customer: int) -> None:
            event = {"name": "use", "external_customer_id": f"c{customer}"}
            async with limit:
                sent = await client.post(
                    "/v1/events/ingest",
                    json={"events": [{**event, "metadata": {"tokens": TOKENS}}]},
                )
            assert sent.status_code == 200, sent.text

        await asyncio.gather(*(one(c) for _ in range(events) for c in range(CUSTOMERS)))


def _set_up(core: Server, token: str, url: str) -> None:
    """A sum meter, the customers, an endpoint at `url`, an alert per threshold and a top-up
    rule, each for every customer."""
    with core.client(token) as http:
        meter = http.post(
            "/v1/meters/",
            json={
                "name": "tokens",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": "sum", "property": "tokens"},
            },
        )
        assert meter.status_code == 201, meter.text
        for c in range(CUSTOMERS):
            customer = {"email": f"c{c}@example.com", "external_id": f"c{c}"}
            assert http.post("/v1/customers/", json=customer).status_code == 201
        kinds = ["meter.alert", "customer_meter.topped_up"]
        endpoint = {"url": url, "format": "raw", "events": kinds}
        assert http.post("/v1/webhooks/endpoints", json=endpoint).status_code == 201
        rule = http.post("/v1/top-up-rules/", json={"meter_id": meter.json()["id"], **TOP_UP})
        assert rule.status_code == 201, rule.text
        for threshold in THRESHOLDS:
            alert = {
                "meter_id": meter.json()["id"],
                "metric": "consumed_units",
                "operator": "gte",
                "threshold": threshold,
                "external_id": f"over-{threshold}",
            }
            assert http.post("/v1/meter-alerts/", json=alert).status_code == 201


def _ids_per_crossing(receiver: Receiver) -> dict[tuple[str, str], set[str]]:
    """The webhook-ids received per crossing (alert, customer) and per top-up ("top-up", its
    id)."""
    found: dict[tuple[str, str], set[str]] = {}
    for r in list(receiver.received):
        data = json.loads(r.body)["data"]
        if "top_up" in data:
            crossing = ("top-up", data["top_up"]["id"])
        else:
            crossing = (data["alert"]["id"], data["customer_meter"]["customer_id"])
        found.setdefault(crossing, set()).add(r.headers["webhook-id"])
    return found


@pytest.mark.parametrize("mode", [_embedded, _kafka], ids=["embedded", "kafka"])
def test_each_alert_reaches_the_receiver_under_one_webhook_id_across_kill_9(
    tmp_path: Path, mode: Callable[[Path], contextlib.AbstractContextManager[Running]]
) -> None:
    with Receiver() as receiver, mode(tmp_path) as running:
        token = edge_token(running.ingest(), new_org_token(tmp_path, f"kill-{uuid.uuid4().hex}"))
        _set_up(running.core(), token, receiver.url)
        started = time.monotonic()
        asyncio.run(_use(running.ingest().url, token, events=5))  # crosses the first threshold
        # Mostly delivered by the kill; what is not is delivered after the restart. The kill
        # must come before the core stores what it applied (the product's timer, not the
        # test's deadline, bounds this wait).
        kill_by = started + FLUSH_SECONDS - 5
        while len(receiver.received) < CUSTOMERS and time.monotonic() < kill_by:
            time.sleep(0.05)
        delivered = len(receiver.received)
        applied_for = time.monotonic() - started
        running.restart()
        asyncio.run(_use(running.ingest().url, token, events=5))  # crosses the second
        wait_for(
            "a delivery of every crossing and top-up",
            lambda: len(_ids_per_crossing(receiver)) >= 4 * CUSTOMERS,
        )
        time.sleep(2)  # the point: time for whatever else would come (a second id)

        ids = _ids_per_crossing(receiver)
        with running.core().client(token) as http:
            made = http.get("/v1/top-ups/", params={"limit": 100}).json()
    assert delivered > 0 and applied_for < FLUSH_SECONDS, "killed after the events were stored"
    assert len(ids) == 4 * CUSTOMERS
    twice = {crossing: found for crossing, found in ids.items() if len(found) > 1}
    assert not twice, f"{len(twice)} of {len(ids)} webhooks delivered under more than one id"
    # Two a customer, numbered 1 and 2 of the day, each the one its webhook named.
    numbers = sorted((item["customer_id"], item["number"]) for item in made["items"])
    assert len(numbers) == 2 * CUSTOMERS and len(set(numbers)) == len(numbers), numbers
    assert {("top-up", item["id"]) for item in made["items"]} <= ids.keys()
