"""A tenant with many meters beside another: what one organization's meters cost another's
ingest latency.

Every event is evaluated against every meter of its organization. That evaluation runs before
the single writer's group commit, on an evaluator thread, one request of an organization at a
time (`Store.prepare`); the writer and the flusher handle the contributions as rows, whose cost
grows with the values, not with how many meters define them. Tenant A sends one 100-event
request a second (100 events/s) with M meters (200, the default `--max-meters-per-organization`,
then 5,000, raised for the measurement: made in the data dir before the server starts); tenant B
sends 50 requests/s of 100 events (`tests.tenants.steady`), alone ("solo") and beside A. Runs
alternate solo / beside; figures are medians over runs.

Hypothesis: B's p99 beside A stays within 2x its solo p99 at the default limit, and within 3x
beside 5,000 meters (A's evaluation and flushes still take CPU on this 2-core machine).

Command: `.venv/bin/python -m benchmarks.run meter_heavy` (`--quick` for a smoke run).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import metric
from benchmarks.server import Server
from tests import tenants
from tests.processes import new_org_token

FULL = {"runs": 3, "seconds": 5.0}
QUICK = {"runs": 1, "seconds": 2.0}
METERS = (200, 5000)


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    details: dict[str, Any] = {"plan": plan}
    metrics = []
    for count in METERS:
        data_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
        try:
            a = new_org_token(data_dir, "hostile")
            tenants.many_meters(data_dir, "hostile", count)
            with Server("--max-meters-per-organization", str(count), data_dir=data_dir) as server:
                b = new_org_token(data_dir, "victim")
                tenants.steady(server.url, b, "warm", seconds=1)
                rows = _measured(server.url, a, b, count, plan)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
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


def _measured(url: str, a: str, b: str, count: int, plan: dict[str, float]) -> dict[str, Any]:
    seconds = plan["seconds"]
    rows: dict[str, list[Any]] = {"solo": [], "beside": [], "a_ms": []}
    for run_ in range(int(plan["runs"])):
        rows["solo"].append(tenants.steady(url, b, f"s{count}{run_}", seconds=seconds))
        stop = threading.Event()
        heavy = threading.Thread(
            target=_heavy, args=(url, a, f"h{count}{run_}", stop, rows["a_ms"])
        )
        heavy.start()
        try:
            rows["beside"].append(tenants.steady(url, b, f"b{count}{run_}", seconds=seconds))
        finally:
            stop.set()
            heavy.join()
    return rows


def _target(count: int) -> tuple[str, float]:
    return ("<=", 2.0) if count == METERS[0] else ("<=", 3.0)


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
