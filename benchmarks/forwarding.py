"""Forwarding to an upstream and nightly reconciliation, between two real `meterline up`
processes on this machine (the upstream is a second meterline: Polar cannot run here).

forward_throughput: an edge holding N realistic events (ingested while it had no upstream) is
restarted with `--upstream-url`; timed from the restart until its backlog is empty. Twice: at
the default rate (500 requests/minute, 1,000 events per request), and unthrottled, which shows
what the forwarder itself can do.

reconcile_1m: the same 1 million events ingested into both; `meterline reconcile` over the hour
that holds them, as a child process: wall time, requests to the upstream, and the reconcile
process's own peak RSS. Against Polar the upstream's reads are capped at 500 requests/minute,
which the details turn into a projected time.

Command: `.venv/bin/python -m benchmarks.run forward_throughput reconcile_1m` (`--quick` for a
smoke run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import metric
from benchmarks.loadgen import make_bodies
from benchmarks.server import Server

BATCH = 1000
# `meterline …` that reports its own peak RSS last on stderr (a benchmark's other children, the
# servers, would otherwise dominate RUSAGE_CHILDREN). VmHWM, not ru_maxrss: Linux carries
# ru_maxrss over exec, so a child would report the benchmark process's own peak.
_PEAK_RSS = (
    "import sys; from aggregator.cli import main; code = main(sys.argv[1:]);"
    " hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0];"
    " print(f'peak_rss_kib={hwm}', file=sys.stderr); sys.exit(code)"
)


def _fill(server: Server, bodies: list[bytes]) -> None:
    with server.client() as client:
        for body in bodies:
            response = client.post(
                "/v1/events/ingest",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=120,
            )
            response.raise_for_status()


def _forward(edge_dir: Path, central: Server, events: int, rate: float) -> dict[str, Any]:
    args = ["--upstream-url", central.url, "--upstream-token", central.token or ""]
    args += ["--upstream-rate", str(rate), "--upstream-batch-events", str(BATCH)]
    started = time.perf_counter()
    with Server(*args, data_dir=edge_dir) as edge, edge.client() as client:
        while True:
            status = client.get("/v1/forwarder/").json()
            if status["backlog"] == 0:
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    requests = -(-events // BATCH) + status["retried"]
    return {
        "rate_limit_per_minute": rate,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_second": round(events / seconds, 1),
        "requests": requests,
        "requests_per_minute": round(requests / seconds * 60, 1),
        "retried": status["retried"],
        "note": "seconds include the edge's start (about 1 s)",
    }


def forward_throughput(quick: bool = False) -> dict[str, Any]:
    """Forwarding drains a backlog at the configured rate, never faster.

    Hypothesis: at the default 500 requests/minute of 1,000 events the forwarder reaches its
    cap (8,333 events/s, 500 requests/minute) and unthrottled it is bound by the upstream's
    ingest, not by reading the outbox.
    """
    events = 20_000 if quick else 200_000
    bodies = make_bodies("fwd", events // BATCH, BATCH, seed=7)
    runs = {}
    with Server() as central:
        for name, rate in (("default_rate", 500.0), ("unthrottled", 1_000_000.0)):
            edge_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-edge-"))
            try:
                with Server(data_dir=edge_dir) as filler:
                    _fill(filler, [b.replace(b'"fwd-', f'"{name}-'.encode()) for b in bodies])
                runs[name] = _forward(edge_dir, central, events, rate)
            finally:
                shutil.rmtree(edge_dir, ignore_errors=True)
        stored = central.total_count()
    default, free = runs["default_rate"], runs["unthrottled"]
    return {
        "metrics": [
            metric("events/s at 500 req/min", default["events_per_second"], "events/s"),
            metric(
                "requests/min at 500 req/min",
                default["requests_per_minute"],
                "req/min",
                "<=",
                500.0,
            ),
            metric("events/s unthrottled", free["events_per_second"], "events/s"),
            metric("events stored upstream", stored, "events", "==", 2 * events),
        ],
        "details": runs,
    }


def reconcile_1m(quick: bool = False) -> dict[str, Any]:
    """Reconciling a million events takes minutes and little memory.

    Hypothesis: reading both sides through the API in pieces of under 100 events costs about
    1.4 requests per 100 events and side, and memory stays at a few hundred MiB (fingerprints
    and per-customer amounts, never the events).
    """
    events = 50_000 if quick else 1_000_000
    bodies = make_bodies("rec", events // BATCH, BATCH, seed=11)
    with Server() as local, Server() as upstream:
        for server in (local, upstream):
            _fill(server, bodies)
            with server.client() as client:
                meter = {
                    "name": "tokens",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "sum", "property": "_llm.total_tokens"},
                }
                client.post("/v1/meters/", json=meter).raise_for_status()
        del bodies
        report = Path(tempfile.mkdtemp(prefix="meterline-bench-")) / "report.json"
        now = datetime.now(UTC)
        command = [
            sys.executable, "-c", _PEAK_RSS, "reconcile",
            "--from", (now - timedelta(hours=2)).isoformat(),
            "--to", (now + timedelta(minutes=10)).isoformat(),
            "--url", local.url, "--token", local.token or "",
            "--upstream-url", upstream.url, "--upstream-token", upstream.token or "",
            "--rate", "1000000", "--report", str(report),
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        peak_mib = int(done.stderr.strip().splitlines()[-1].removeprefix("peak_rss_kib=")) / 1024
        if done.returncode != 0:
            raise RuntimeError(f"reconcile exited {done.returncode}: {done.stderr[-2000:]}")
        answer = json.loads(report.read_text())
        shutil.rmtree(report.parent, ignore_errors=True)
    requests = answer["upstream"]["requests"]
    return {
        "metrics": [
            metric("events per side", answer["local"]["events"], "events"),
            metric("reconcile wall time", seconds, "s"),
            metric("reconcile peak RSS", round(peak_mib, 1), "MiB"),
            metric("upstream requests", requests, "requests"),
        ],
        "details": {
            "drift_found": answer["drift_found"],
            "compared": answer["compared"],
            "upstream_events": answer["upstream"]["events"],
            "projected_minutes_at_polar_500_per_minute": round(requests / 500, 1),
            "peak_rss_note": "the reconcile process's own VmHWM",
        },
    }
