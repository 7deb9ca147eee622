"""Alert latency: how long after the commit of the batch that crossed a `meter.alert` reaches a
receiver, while ingest runs at 50,000 events/s.

alert_latency: a real `meterline up --allow-private-webhooks`, one sum meter, events of 2,000
customers, 200 of whom exist as customers with an alert each (`consumed_units gte T`, T drawn
so that the crossings spread over the run), a webhook endpoint on a local receiver (its own
thread, answering 200). Batches of 1,000 events (each of a random customer of the 2,000, 1
unit) are sent at 50,000 events/s for the run. Latency of each delivery: the receiver's clock
at arrival less the event's `timestamp`, which is the time of the change, taken inside the
transaction just before it commits (so the figure includes the commit). The same load is
first run with no alert and no endpoint: the ingest rate with alerts is reported as a ratio
to it. Target: p99 <= 1 s, every customer that crossed alerted exactly once.

Command: `.venv/bin/python -m benchmarks.run alert_latency` (`--quick` for a smoke run).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import datetime
from typing import Any

import httpx

from benchmarks.common import metric, percentile
from benchmarks.server import Server
from tests.aggregator.upstream.webhook_receiver import Receiver

RATE = 50_000  # events per second
BATCH = 1_000
IN_FLIGHT = 8  # requests at once, as loadgen's clients
CUSTOMERS = 2_000
ALERTED = 200  # customers c0 .. c199, one alert each
FULL = {"seconds": 20}
QUICK = {"seconds": 3}
TARGET_P99_S = 1.0


def _setup(http: httpx.Client, receiver: Receiver | None, thresholds: list[int]) -> None:
    meter = http.post(
        "/v1/meters/",
        json={
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        },
    )
    meter.raise_for_status()
    if receiver is None:
        return
    http.post(
        "/v1/webhooks/endpoints",
        json={
            "url": receiver.url,
            "format": "raw",
            "events": ["meter.alert"],
        },
    ).raise_for_status()
    for i, threshold in enumerate(thresholds):
        customer = http.post(
            "/v1/customers/", json={"email": f"c{i}@example.com", "external_id": f"c{i}"}
        )
        customer.raise_for_status()
        http.post(
            "/v1/meter-alerts/",
            json={
                "meter_id": meter.json()["id"],
                "customer_id": customer.json()["id"],
                "metric": "consumed_units",
                "operator": "gte",
                "threshold": threshold,
                "external_id": f"bench-{i}",
            },
        ).raise_for_status()


async def _load(url: str, token: str, seconds: float, seed: int) -> dict[str, Any]:
    """Send batches at RATE for `seconds`; per customer, the units sent."""
    rng = random.Random(seed)
    sent: dict[str, int] = {}
    interval = BATCH / RATE
    started = time.perf_counter()
    batches = int(seconds * RATE / BATCH)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        limits=httpx.Limits(max_connections=IN_FLIGHT),
    ) as client:
        pending: set[asyncio.Task[httpx.Response]] = set()
        for b in range(batches):
            events = []
            for _ in range(BATCH):
                customer = f"c{rng.randrange(CUSTOMERS)}"
                sent[customer] = sent.get(customer, 0) + 1
                events.append(
                    {"name": "use", "external_customer_id": customer, "metadata": {"tokens": 1}}
                )
            delay = started + b * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(pending) >= IN_FLIGHT:  # behind: the rate achieved is what is reported
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done = {t for t in pending if t.done()}
                for task in done:
                    task.result().raise_for_status()
                pending -= done
            pending.add(
                asyncio.ensure_future(client.post("/v1/events/ingest", json={"events": events}))
            )
            done = {t for t in pending if t.done()}
            for task in done:
                task.result().raise_for_status()
            pending -= done
        for response in await asyncio.gather(*pending):
            response.raise_for_status()
    elapsed = time.perf_counter() - started
    return {"sent": sent, "events": batches * BATCH, "seconds": elapsed}


def _run(quick: bool, alerts: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    per_customer = plan["seconds"] * RATE / CUSTOMERS
    rng = random.Random(11)
    # Crossing times spread over the run (between 5 % and 90 % of it).
    thresholds = [max(1, int(per_customer * rng.uniform(0.05, 0.9))) for _ in range(ALERTED)]
    receiver = Receiver().start() if alerts else None
    try:
        with Server("--allow-private-webhooks") as server:
            assert server.token is not None
            with server.client() as http:
                _setup(http, receiver, thresholds)
            load = asyncio.run(_load(server.url, server.token, plan["seconds"], seed=7))
            crossed = sum(1 for i, t in enumerate(thresholds) if load["sent"].get(f"c{i}", 0) >= t)
            if receiver is not None:
                deadline = time.monotonic() + 30
                while len(receiver.received) < crossed and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1)  # any extra (duplicate) delivery would arrive by now
    finally:
        if receiver is not None:
            receiver.stop()
    result: dict[str, Any] = {
        "events": load["events"],
        "seconds": round(load["seconds"], 3),
        "events_per_second": round(load["events"] / load["seconds"]),
        "customers_crossed": crossed,
    }
    if receiver is not None:
        latencies = []
        customers = []
        for arrival in receiver.received:
            event = json.loads(arrival.body)
            latencies.append(arrival.at - _epoch(event["timestamp"]))
            customers.append(event["data"]["customer_meter"]["customer"]["external_id"])
        result |= {
            "alerts_delivered": len(receiver.received),
            "distinct_customers_alerted": len(set(customers)),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "latency_max_s": max(latencies) if latencies else float("nan"),
        }
    return result


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def alert_latency(quick: bool = False) -> dict[str, Any]:
    """Alerts reach their receiver within 1 s (p99) of the commit that crossed, at 50k ev/s.

    Hypothesis: firing in the ingest transaction and a sender woken by its commit deliver each
    crossing once, p99 within 1 s, without slowing ingest by more than a few percent.
    """
    baseline = _run(quick, alerts=False)
    hooked = _run(quick, alerts=True)
    exact = (
        hooked["alerts_delivered"]
        == hooked["distinct_customers_alerted"]
        == hooked["customers_crossed"]
    )
    return {
        "metrics": [
            metric("ingest rate with alerts", hooked["events_per_second"], "events/s"),
            metric(
                "ingest rate, with alerts / without",
                hooked["events_per_second"] / baseline["events_per_second"],
                "ratio",
            ),
            metric("alert latency p50", hooked["latency_p50_s"], "s"),
            metric("alert latency p99", hooked["latency_p99_s"], "s", "<=", TARGET_P99_S),
            metric("customers alerted once each / crossed", float(exact), "all", ">=", 1.0),
        ],
        "details": {"without_alerts": baseline, "with_alerts": hooked, "rate_sent": RATE},
    }
