"""Fan-out: how long organization-wide reads take when every shard holds a part of them.

Hypothesis: a read that shards answer in part (`aggregator.api.fan_out`) costs about one
shard's answer plus one concurrent round trip to the others, so its latency grows little from
1 to 2 to 4 shards; what grows is the data each part carries (an event list's page p × l of
every shard, every shard's event names).

Command: `.venv/bin/python -m benchmarks.run fan_out` (`--quick`: fewer events and requests).

Each run: a fresh broker (Tansu, memory storage), N shard cores (`--shard I/N`, own data dirs,
the cluster secret) with the 10 meters of `benchmarks.meters`, each leading its shard; loadgen
events as edges write them (columnar records over 6 partitions) published and applied. Then,
one after another, asked of shard 0's core: a meter's quantities over all customers (31 days,
per day), the first page of the event list (100 events), its 20th
page of 100, and the event names. p50 and p99 of each (medians of 3 runs, interleaved), and
each p50 over 1 shard's in the same run (the machine's 2 cores serve the broker and every
shard: 4 shards share them).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import metric
from benchmarks.kafka import columnar_requests, create_token, kafka_args, publish_columnar
from benchmarks.meters import METERS
from benchmarks.server import Server
from benchmarks.shards import start_shards
from tests import deadline
from tests.deadline import wait_for
from tests.processes import Broker

SHARDS = (1, 2, 4)
BATCHES = 100  # of 1,000 events
QUICK_BATCHES = 20
REQUESTS = 200  # of each read
QUICK_REQUESTS = 30


def _reads(meter_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
    now = datetime.now(UTC)
    window = {
        "start_timestamp": (now - timedelta(days=30)).isoformat(),
        "end_timestamp": (now + timedelta(days=1)).isoformat(),
        "interval": "day",
    }
    return {
        "quantities": (f"/v1/meters/{meter_id}/quantities", window),
        "events page 1": ("/v1/events/", {"limit": 100}),
        "events page 20": ("/v1/events/", {"limit": 100, "page": 20}),
        "event names": ("/v1/events/names", {"limit": 100}),
    }


def _run(shards: int, batches: int, requests: int, work: Path) -> dict[str, dict[str, float]]:
    """One deployment of `shards`: each read's latencies (ms) asked of shard 0."""
    with Broker() as broker:
        token, organization = create_token(work / "shard0")
        args = (*kafka_args(broker), "--validation-workers", "0")
        servers: list[Server] = []
        try:
            start_shards(servers, shards, args, work, token)
            with servers[0].client(token) as client:
                meters = [client.post("/v1/meters/", json=d) for d in METERS]
                assert all(m.status_code == 201 for m in meters)
            published = columnar_requests(organization, batches, seed=shards, tag="fan")
            asyncio.run(publish_columnar(broker.bootstrap, "meterline.events", published))
            n = sum(r.events for records in published for r in records)
            with deadline.budget(300):
                wait_for(
                    f"the shards to hold {n} events",
                    lambda: sum(s.total_count(here=True) for s in servers) >= n,
                )
            # Every shard lists the others (heartbeats) before the timing.
            with servers[0].client(token) as client:
                wait_for(
                    "every shard to list the others",
                    lambda: len(client.get("/v1/cluster/").json()["items"]) == shards,
                )

                latencies: dict[str, list[float]] = {}
                for name, (path, params) in _reads(meters[0].json()["id"]).items():
                    found = latencies[name] = []
                    for _ in range(requests):
                        started = time.perf_counter()
                        answer = client.get(path, params=params)
                        found.append((time.perf_counter() - started) * 1000)
                        assert answer.status_code == 200, answer.text
        finally:
            for server in servers:
                server.kill()
    summary = {
        name: {"p50_ms": statistics.median(ms), "p99_ms": statistics.quantiles(ms, n=100)[98]}
        for name, ms in latencies.items()
    }
    print(f"   {shards} shard(s): {summary}", flush=True)
    return summary


def run(quick: bool = False) -> dict[str, Any]:
    batches = QUICK_BATCHES if quick else BATCHES
    requests = QUICK_REQUESTS if quick else REQUESTS
    results: dict[int, list[dict[str, dict[str, float]]]] = {n: [] for n in SHARDS}
    for _ in range(1 if quick else 3):  # interleaved: the machine's load falls on each alike
        for shards in SHARDS:
            work = Path(tempfile.mkdtemp(prefix="meterline-fan-out-"))
            try:
                results[shards].append(_run(shards, batches, requests, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)

    def median(shards: int, read: str, figure: str) -> float:
        return float(statistics.median(r[read][figure] for r in results[shards]))

    reads = list(results[1][0])
    return {
        "metrics": [
            *(
                metric(f"{read} {f[:3]}, {shards} shard(s)", median(shards, read, f), "ms")
                for shards in SHARDS
                for read in reads
                for f in ("p50_ms", "p99_ms")
            ),
            *(
                metric(
                    f"{read} p50, {shards} shards / 1 shard",
                    median(shards, read, "p50_ms") / median(1, read, "p50_ms"),
                    "x",
                )
                for shards in SHARDS[1:]
                for read in reads
            ),
        ],
        "events": batches * 1_000,
        "requests_per_read": requests,
        "runs": {str(k): v for k, v in results.items()},
    }
