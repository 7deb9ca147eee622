"""Shards: what a core applies per core-second when it owns half the partitions.

Hypothesis: a shard (`meterline core --shard I/N`) does a one-shard core's work on its own
partitions and nothing more (the control topic it reads whole is small), so events applied per
core-second by each of 2 shards are at least 0.9 of one shard's. N shards on N cores then apply
N times the events; what bounds N is the partition count, the control topic every shard reads,
and, for reads, the fan-out.

Command: `.venv/bin/python -m benchmarks.run shards` (`--quick`: smaller, one run each).

Each run: a fresh broker (Tansu, memory storage), then either one core or two shard cores
(`--shard 0/2`, `--shard 1/2`, own data dirs, the cluster secret) with the 10 meters of
`benchmarks.meters`, each leading its shard. The cores are paused (SIGSTOP, within their group
session) while N loadgen events as edges write them (columnar records, 6 partitions) are
published from this process, so that the broker and the load generator do not compete with the
timed part; then resumed, and each core is timed until the API counts its events stored, with
its CPU seconds over that time. Two shards are drained together (they share this machine's 2
cores with each other and the broker) and, in another run, apart (one resumed at a time: what
a shard costs with cores of its own, as on a machine with a core per shard). The figure: the
median shard's events per CPU second drained apart, over one shard's, in the same run (runs
interleaved, medians); drained together is given beside it, and the wall time of each.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import metric
from benchmarks.kafka import columnar_requests, create_token, kafka_args, publish_columnar
from benchmarks.meters import METERS
from benchmarks.server import Server
from tests.deadline import wait_for
from tests.processes import Broker

SHARDS = (1, 2)
BATCHES = 1_000  # of 1,000 events: 1 M events
QUICK_BATCHES = 200
TARGET_RATIO = 0.9
# Longer than the pause: a paused leader keeps its lease.
SESSION = ("--consumer-session-timeout-seconds", "45")


def _signal(servers: list[Server], sent: signal.Signals) -> None:
    for server in servers:
        os.kill(server.pid, sent)


def start_shards(
    servers: list[Server], count: int, args: tuple[str, ...], work: Path, token: str
) -> None:
    """`count` shard cores of one deployment (`work / "shard0"` holds the cluster secret), each
    leading its shard; added to `servers` as they start, so that the caller kills every one
    started whatever happens."""
    secret = ("--secret-file", str(work / "shard0" / "secret.key"))
    for i in range(count):
        shard = ("--shard", f"{i}/{count}")
        server = Server(*args, *secret, *shard, command="core", data_dir=work / f"shard{i}")
        servers.append(server.start())
        server.token = token
    for server in servers:
        wait_for(
            "every shard to lead", lambda s=server: any("this core leads" in x for x in s.output)
        )


def _run(shards: int, batches: int, work: Path, *, apart: bool = False) -> dict[str, Any]:
    """One run: `shards` cores of one deployment, timed draining `batches` thousand events,
    together, or `apart` (one shard resumed at a time, the others paused meanwhile)."""
    n = batches * 1_000
    with Broker() as broker:
        token, organization = create_token(work / "shard0")
        args = (*kafka_args(broker), "--validation-workers", "0", *SESSION)
        servers: list[Server] = []
        try:
            start_shards(servers, shards, args, work, token)
            with servers[0].client(token) as client:
                for definition in METERS:
                    answer = client.post("/v1/meters/", json=definition)
                    assert answer.status_code == 201, answer.text
            for server in servers:  # every shard has the meters before the timing
                with server.client(token) as client:
                    wait_for(
                        "every shard to have the meters",
                        lambda c=client: (
                            c.get("/v1/meters/").status_code == 200
                            and len(c.get("/v1/meters/").json()["items"]) == len(METERS)
                        ),
                    )

            requests = columnar_requests(organization, batches, seed=shards, tag="shards")
            expected = [0] * shards  # each shard's events: those of its partitions
            for records in requests:
                for record in records:
                    expected[record.partition % shards] += record.events
            assert sum(expected) == n
            _signal(servers, signal.SIGSTOP)
            try:
                started = time.monotonic()
                asyncio.run(publish_columnar(broker.bootstrap, "meterline.events", requests))
                published = time.monotonic() - started
                cpu, wall = [0.0] * shards, 0.0
                for group in [[i] for i in range(shards)] if apart else [list(range(shards))]:
                    timed = _drain([servers[i] for i in group], [expected[i] for i in group])
                    for i, (_, used) in zip(group, timed, strict=True):
                        cpu[i] = used
                    wall += max(took for took, _ in timed)
            finally:
                _signal(servers, signal.SIGCONT)
        finally:
            for server in servers:
                server.kill()
    counts = expected
    per_cpu = [count / seconds for count, seconds in zip(counts, cpu, strict=True)]
    how = " apart" if apart else ""
    print(
        f"   {shards} shard(s){how}: drained {n:,} events in {wall:.1f} s; per shard events"
        f" {counts}, CPU s {[round(c, 1) for c in cpu]}, per CPU s {[round(x) for x in per_cpu]}",
        flush=True,
    )
    return {
        "events": n,
        "publish_seconds": round(published, 3),
        "drain_seconds": round(wall, 3),
        "events_per_shard": counts,
        "cpu_seconds": [round(c, 3) for c in cpu],
        "events_per_cpu_second": [round(x) for x in per_cpu],
    }


def _drain(servers: list[Server], expected: list[int]) -> list[tuple[float, float]]:
    """Resume the paused `servers` and time each until it holds its `expected` events: (wall
    seconds, CPU seconds) each."""
    cpu = [s.cpu_all() for s in servers]
    _signal(servers, signal.SIGCONT)
    started = time.monotonic()
    done: dict[int, tuple[float, float]] = {}
    while len(done) < len(servers) and time.monotonic() - started < 900:
        for i, server in enumerate(servers):
            if i not in done and server.total_count(here=True) >= expected[i]:
                done[i] = (time.monotonic() - started, server.cpu_all() - cpu[i])
        time.sleep(0.5)
    if len(done) < len(servers):
        raise RuntimeError(f"not every shard applied its events within 900 s: {done}")
    return [done[i] for i in range(len(servers))]


# What each run is: (name, shards, drained apart).
RUNS = (("1 shard", 1, False), ("2 shards", 2, False), ("2 shards apart", 2, True))


def run(quick: bool = False) -> dict[str, Any]:
    runs = 1 if quick else 3
    batches = QUICK_BATCHES if quick else BATCHES
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in RUNS}
    for _ in range(runs):  # interleaved: the machine's load falls on each alike
        for name, shards, apart in RUNS:
            work = Path(tempfile.mkdtemp(prefix="meterline-shards-"))
            try:
                results[name].append(_run(shards, batches, work, apart=apart))
            finally:
                shutil.rmtree(work, ignore_errors=True)

    def per_cpu(name: str) -> float:
        """The median shard's events per CPU second, median of the runs."""
        return float(
            statistics.median(statistics.median(r["events_per_cpu_second"]) for r in results[name])
        )

    one = per_cpu("1 shard")
    return {
        "metrics": [
            metric(
                "events per CPU second, each of 2 shards drained apart / 1 shard",
                per_cpu("2 shards apart") / one,
                "x",
                ">=",
                TARGET_RATIO,
            ),
            metric(
                "events per CPU second, each of 2 shards drained together / 1 shard",
                per_cpu("2 shards") / one,
                "x",
            ),
            *(
                metric(f"events per CPU second, {name}", per_cpu(name), "events/s")
                for name in results
            ),
            *(
                metric(
                    f"drain wall throughput, {name}",
                    batches * 1_000 / statistics.median(r["drain_seconds"] for r in results[name]),
                    "events/s",
                )
                for name in results
            ),
        ],
        "runs": results,
    }
