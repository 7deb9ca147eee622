"""API writes as records, side by side with the previous main in one run.

Hypothesis: making every API write a record costs an embedded write one more row (its outcome,
in the same transaction: well under a millisecond); in Kafka mode a write is a produce to the
control topic, a fetch back and its group's journal entry before it is applied (a few
milliseconds each on loopback); ingest,
whose path only gains derived event ids, keeps at least 0.9 of the previous main's throughput.

The previous main is a git worktree of `PREVIOUS` (or `METERLINE_BENCH_PREVIOUS`), run by this
interpreter; the current code is this checkout. For each mode (embedded; Kafka: a Tansu broker
with memory storage, `meterline up --kafka`), both versions are started in turn, `ROUNDS` times
alternating, and each round times `WRITES` sequential credits and then `WRITES` holds (one
unit each, on a customer credited enough) from one client on loopback, nothing else running.
Figures are medians over rounds of each round's p50 and p99. Ingest is `ingest_http`'s load
(8 requests of 1,000 events in flight) against each version, embedded.

    .venv/bin/python -m benchmarks.run api_writes
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks import ingest_http
from benchmarks.common import metric, percentile
from benchmarks.server import Server
from tests.processes import Broker

# The main before API writes became records.
PREVIOUS = "f9e8829"
ROOT = Path(__file__).resolve().parent.parent
ROUNDS, WRITES = 3, 300
QUICK_ROUNDS, QUICK_WRITES = 1, 30


@contextlib.contextmanager
def previous_checkout() -> Iterator[Path]:
    """A worktree of the previous main, removed afterwards."""
    ref = os.environ.get("METERLINE_BENCH_PREVIOUS", PREVIOUS)
    path = Path(tempfile.mkdtemp(prefix="meterline-previous-")) / "checkout"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
            check=False,
            capture_output=True,
        )


def _timed(client: httpx.Client, path: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.text
    return elapsed


def _round(server: Server, writes: int, current: bool) -> dict[str, list[float]]:
    auth = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
        # Which code answers: the digest came with write records.
        digest = client.get("/v1/cluster/digest").status_code
        assert digest == (200 if current else 404), f"not the {current=} code: {digest}"
        meter = {
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
        meter_id = client.post("/v1/meters/", json=meter).json()["id"]
        customer = client.post("/v1/customers/", json={"email": "ada@example.com"}).json()["id"]
        ref = {"customer_id": customer, "meter_id": meter_id}
        grant = {**ref, "units": 10**9, "external_id": "grant"}
        _timed(client, "/v1/meter-credits/", grant)
        credits = [
            _timed(client, "/v1/meter-credits/", {**ref, "units": 1, "external_id": f"c{i}"})
            for i in range(writes)
        ]
        holds = [
            _timed(client, "/v1/meter-holds/", {**ref, "units": 1, "external_id": f"h{i}"})
            for i in range(writes)
        ]
    return {"credit": credits, "hold": holds}


def _latencies(checkout: Path | None, kafka: bool, writes: int) -> dict[str, list[float]]:
    with contextlib.ExitStack() as stack:
        args: tuple[str, ...] = ()
        if kafka:
            broker = stack.enter_context(Broker())
            args = ("--kafka", broker.bootstrap, "--no-idempotence")
        server = stack.enter_context(Server(*args, checkout=checkout))
        return _round(server, writes, checkout is None)


def run(quick: bool = False) -> dict[str, Any]:
    rounds, writes = (QUICK_ROUNDS, QUICK_WRITES) if quick else (ROUNDS, WRITES)
    figures: dict[str, dict[str, list[float]]] = {}
    with previous_checkout() as previous:
        versions = {"previous": previous, "current": None}
        for mode in ("embedded", "kafka"):
            for i in range(rounds):
                for version, checkout in versions.items():
                    print(f"   {mode}, {version}, round {i + 1}/{rounds}", flush=True)
                    found = _latencies(checkout, mode == "kafka", writes)
                    for write, seconds in found.items():
                        for q in (50, 99):
                            key = f"{mode} {write} p{q} ({version})"
                            figures.setdefault(key, {"values": []})["values"].append(
                                percentile(seconds, q) * 1000
                            )
        ingest = {
            version: ingest_http.measure(quick, checkout=checkout)
            for version, checkout in versions.items()
        }
    metrics = []
    for mode in ("embedded", "kafka"):
        for write in ("credit", "hold"):
            for q in (50, 99):
                before = statistics.median(figures[f"{mode} {write} p{q} (previous)"]["values"])
                after = statistics.median(figures[f"{mode} {write} p{q} (current)"]["values"])
                metrics.append(metric(f"{mode}: {write} p{q}, previous main", before, "ms"))
                metrics.append(metric(f"{mode}: {write} p{q}, write records", after, "ms"))
    rates = {
        version: next(m for m in result["metrics"] if m["name"].startswith("events/s (median"))
        for version, result in ingest.items()
    }
    metrics.append(metric("ingest events/s, previous main", rates["previous"]["value"], "events/s"))
    metrics.append(metric("ingest events/s, write records", rates["current"]["value"], "events/s"))
    metrics.append(
        metric(
            "ingest throughput / previous main",
            rates["current"]["value"] / rates["previous"]["value"],
            "ratio",
            ">=",
            0.9,
        )
    )
    return {
        "metrics": metrics,
        "details": {
            "previous": os.environ.get("METERLINE_BENCH_PREVIOUS", PREVIOUS),
            "rounds": rounds,
            "writes_per_round": writes,
            "latency_ms_per_round": {k: v["values"] for k, v in figures.items()},
            "ingest": {v: r["details"]["runs"] for v, r in ingest.items()},
        },
    }
