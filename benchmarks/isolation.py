"""Tenant isolation: what one organization's flood costs another's ingest.

Tenant B sends 50 requests/s of 100 events over 4 keep-alive connections (`tests.tenants.
steady`) to a real `meterline up` with default limits: alone ("solo"), then while tenant A, in
its own process, floods `POST /v1/events/ingest` with 1,000-event bodies over 80 connections,
(a) at up to 125 MB/s (a 1 Gbit/s link, what one remote client host can push) and (b) as fast
as loopback takes them. Runs alternate solo / flooded; the figures are medians over runs, the
ratio the median of each flooded run's p99 over the solo run's just before it.

Hypothesis (issue 13's bar): B keeps ≥ 99% success and a p99 latency ≤ 2× its solo p99 while A
floods. A's answers are counted too: 200 while within its rate and share, 429 past them.

Command: `.venv/bin/python -m benchmarks.run isolation` (`--quick` for a smoke run).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.common import metric
from benchmarks.server import Server
from tests import tenants

FULL = {"runs": 5, "seconds": 5.0}
QUICK = {"runs": 1, "seconds": 2.0}
FLOODS = {"1 Gbit/s flood": 125e6, "loopback flood": 0.0}


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    seconds = plan["seconds"]
    details: dict[str, Any] = {"plan": plan, "solo": [], **{name: [] for name in FLOODS}}
    with Server() as server:
        a, b = tenants.two_tenants(server.url, server.data_dir)
        for run_ in range(int(plan["runs"])):
            details["solo"].append(_row(tenants.steady(server.url, b, f"s{run_}", seconds=seconds)))
            for name, link in FLOODS.items():
                body = tenants.events_body(f"a{run_}{link:.0f}", 1000)
                request = tenants.ingest_request(server.url, a, body)
                flood = tenants.in_process(
                    tenants.flood, server.url, request, 80, seconds + 2, link
                )
                time.sleep(1.5)
                measured = tenants.steady(server.url, b, f"{name}{run_}", seconds=seconds)
                details[name].append({**_row(measured), "hostile": flood.result()})
    solo = details["solo"]
    metrics = [metric("B solo p99", statistics.median(r["p99_ms"] for r in solo), "ms")]
    for name in FLOODS:
        rows = details[name]
        # Each flooded run against the solo run just before it: the store grows from run to
        # run, and with it the solo latency.
        ratio = statistics.median(
            r["p99_ms"] / s["p99_ms"] for r, s in zip(rows, solo, strict=True)
        )
        accepted = statistics.median(r["hostile"].get(200, 0) for r in rows) * 1000 / (seconds + 2)
        metrics += [
            metric(f"B success, {name}", min(r["success"] for r in rows), "ratio", ">=", 0.99),
            metric(f"B p99, {name}", statistics.median(r["p99_ms"] for r in rows), "ms"),
            metric(f"B p99 / solo p99, {name}", ratio, "x", "<=", 2),
            metric(f"A events accepted/s, {name}", accepted, "events/s"),
        ]
    return {"metrics": metrics, "details": details}


def _row(measured: tenants.Measured) -> dict[str, Any]:
    return {
        "success": measured.success,
        "p50_ms": round(measured.p50_ms, 2),
        "p99_ms": round(measured.p99_ms, 2),
        "statuses": measured.statuses,
    }
