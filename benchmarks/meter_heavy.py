"""A tenant with many meters beside another: what one organization's meters cost another's
ingest latency.

Every event is evaluated against every meter of its organization inside the single writer's
group commit, so the work of one request grows with its organization's meters, and another
organization's request waits for it. Tenant A sends one 100-event request a second (100
events/s) with M meters (200, the default `--max-meters-per-organization`, then 1,000, raised
for the measurement); tenant B sends 50 requests/s of 100 events (`tests.tenants.steady`), alone
("solo") and beside A. Runs alternate solo / beside; figures are medians over runs.

Hypothesis: at the default limit, B's p99 beside A stays within 10× its solo p99 (a single
100-event request of A holds the writer ~0.1 s here).

Command: `.venv/bin/python -m benchmarks.run meter_heavy` (`--quick` for a smoke run).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx

from benchmarks.common import metric
from benchmarks.server import Server
from tests import tenants

FULL = {"runs": 3, "seconds": 5.0}
QUICK = {"runs": 1, "seconds": 2.0}
METERS = (200, 1000)


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    seconds = plan["seconds"]
    details: dict[str, Any] = {"plan": plan}
    metrics = []
    with Server("--max-meters-per-organization", str(max(METERS))) as server:
        a, b = tenants.two_tenants(server.url, server.data_dir)
        made = 0
        for count in METERS:
            with httpx.Client(base_url=server.url, headers=_auth(a), timeout=60) as client:
                for i in range(made, count):
                    meter = {
                        "name": f"meter {i}",
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": {"func": "sum", "property": "tokens"},
                    }
                    client.post("/v1/meters/", json=meter).raise_for_status()
                _backfilled(client)
            made = count
            rows: dict[str, list[Any]] = {"solo": [], "beside": [], "a_ms": []}
            for run_ in range(int(plan["runs"])):
                rows["solo"].append(
                    tenants.steady(server.url, b, f"s{count}{run_}", seconds=seconds)
                )
                stop = threading.Event()
                heavy = threading.Thread(
                    target=_heavy, args=(server.url, a, f"h{count}{run_}", stop, rows["a_ms"])
                )
                heavy.start()
                try:
                    rows["beside"].append(
                        tenants.steady(server.url, b, f"b{count}{run_}", seconds=seconds)
                    )
                finally:
                    stop.set()
                    heavy.join()
            solo = statistics.median(m.p99_ms for m in rows["solo"])
            beside = statistics.median(m.p99_ms for m in rows["beside"])
            details[f"{count} meters"] = {
                "solo_p99_ms": [m.p99_ms for m in rows["solo"]],
                "beside_p99_ms": [m.p99_ms for m in rows["beside"]],
                "a_request_ms": rows["a_ms"],
            }
            metrics += [
                metric(f"B p99 solo ({count} meters of A)", solo, "ms"),
                metric(f"B p99 beside A ({count} meters)", beside, "ms"),
                metric(f"B p99 ratio ({count} meters)", beside / solo, "ratio", *_target(count)),
                metric(
                    f"A 100-event request ({count} meters), median",
                    statistics.median(rows["a_ms"]),
                    "ms",
                ),
                metric(
                    f"B success beside A ({count} meters)",
                    min(m.succeeded / m.sent for m in rows["beside"]),
                    "ratio",
                ),
            ]
    return {"metrics": metrics, "details": details}


def _target(count: int) -> tuple[str, float] | tuple[()]:
    """The hypothesis holds at the default limit; past it the figure is informational."""
    return ("<=", 10.0) if count == METERS[0] else ()


def _backfilled(client: httpx.Client) -> None:
    """Until every meter's backfill is done: new meters read the stored events once, which
    would be measured too otherwise."""
    while True:
        running = 0
        for page in range(1, 1000):
            found = client.get("/v1/meters/", params={"page": page, "limit": 100}).json()
            running += sum(m["backfill"]["status"] == "running" for m in found["items"])
            if page >= found["pagination"]["max_page"]:
                break
        if not running:
            return
        time.sleep(0.5)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _heavy(url: str, token: str, tag: str, stop: threading.Event, latencies: list[float]) -> None:
    """One request of 100 events a second until `stop`, each one's latency in ms."""
    with httpx.Client(base_url=url, headers=_auth(token), timeout=60) as client:
        sent = 0
        while not stop.is_set():
            started = time.perf_counter()
            body = tenants.events_body(f"{tag}-{sent}", 100)
            answer = client.post(
                "/v1/events/ingest", content=body, headers={"Content-Type": "application/json"}
            )
            # A 503 (not durable within the deadline) is measured as what it took, too.
            assert answer.status_code in (200, 503), answer.text
            latencies.append((time.perf_counter() - started) * 1000)
            sent += 1
            stop.wait(max(0.0, 1.0 - (time.perf_counter() - started)))
