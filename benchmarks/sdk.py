"""The SDK (`ingest.sdk`): what `ingest()` costs the application, and how fast events reach a
local meterline; compared in the same run with polar-sdk's `Ingestion` helper (polar-sdk 0.32,
the last release that ships it), with its defaults and tuned.

sdk_record: one thread calls `ingest()` on N realistic LLM usage events (loadgen's, without
external_id or timestamp: each client stamps its own), timing the calls alone. "idle": nothing
is sent meanwhile (a long linger, an address nothing listens on), so the figure is record()'s
own cost; "while delivering": default settings against a live local meterline, the senders
sharing the process (and its GIL) with the recording thread. Target ≥ 100,000 events/s (idle).
polar-sdk's helper, idle likewise, with its defaults (queue of 10,000: N = 10,000) and tuned
(queue of N).

sdk_deliver: N events recorded as fast as possible, then `flush()`: events/s = N / (first
ingest() to flush() returned); the server's count is checked to have grown by exactly N.
Target ≥ 50,000 events/s. polar-sdk's helper gets the same events: with its defaults (one batch
of 50 per 5 s) over a fixed window (the events stored / the window); tuned (batches of 1,000,
no wait between batches, queue of N) until the server holds all N.

Command: `.venv/bin/python -m benchmarks.run sdk_record sdk_deliver` (`--quick` for a smoke
run). polar-sdk 0.32 cannot share the venv with polar-sdk ≥ 1.0 (the test extra), so it is
installed with pip into `.venv/peers/polar-sdk-0.32.0` on first use and run in a subprocess
(`benchmarks/peers/polar_ingestion.py`).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import metric
from benchmarks.loadgen import CUSTOMERS, make_event
from benchmarks.server import Server
from ingest.sdk import Ingestion

TARGET_RECORD = 100_000
TARGET_DELIVER = 50_000
POLAR_SDK = "polar-sdk==0.32.0"
PEER_DIR = Path(sys.prefix) / "peers" / "polar-sdk-0.32.0"
PEER = "benchmarks.peers.polar_ingestion"
DEAD_URL = "http://127.0.0.1:9"  # nothing listens: nothing is delivered while recording
FULL = {"n": 200_000, "runs": 5, "peer_runs": 3, "window": 15.0}
QUICK = {"n": 20_000, "runs": 2, "peer_runs": 1, "window": 3.0}
POLAR_TUNED = {"max_batch_size": 1000, "flush_interval": 0.0}


def usage_events(n: int, run: str) -> list[dict[str, Any]]:
    """N distinct event dicts (shallow copies of 1,000 realistic ones), tagged with `run`."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    pool = []
    for _ in range(1000):
        event = make_event(rng, "", f"cust_{rng.randrange(CUSTOMERS):04d}", now)
        del event["external_id"], event["timestamp"]
        event["metadata"] = {**event["metadata"], "run": run}
        pool.append(event)
    return [{**pool[i % 1000]} for i in range(n)]


def _peer(mode: str, url: str, token: str, n: int, options: dict[str, Any], **extra: Any) -> Any:
    """One run of polar-sdk's helper in its own process; its JSON result."""
    if not (PEER_DIR / "polar_sdk").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(PEER_DIR), POLAR_SDK],
            check=True,
        )
    root = Path(__file__).parents[1]
    args = {"mode": mode, "url": url, "token": token, "n": n, "options": options, **extra}
    done = subprocess.run(
        [sys.executable, "-m", PEER, json.dumps(args)],
        env={**os.environ, "PYTHONPATH": f"{PEER_DIR}{os.pathsep}{root}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=root,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _record(ingestion: Ingestion, events: list[dict[str, Any]]) -> float:
    ingest = ingestion.ingest
    started = time.perf_counter()
    for event in events:
        ingest(event)
    return len(events) / (time.perf_counter() - started)


def sdk_record(quick: bool = False) -> dict[str, Any]:
    """record() from one thread costs at most 10 µs: ≥ 100,000 events/s."""
    size = QUICK if quick else FULL
    n = size["n"]
    idle: list[float] = []
    for run in range(size["runs"]):
        events = usage_events(n, f"record-idle-{run}")
        with Ingestion(
            "t",
            base_url=DEAD_URL,
            flush_interval=3600,
            max_batch_size=n,
            max_batch_bytes=1 << 40,
            max_queue_size=n,
            flush_at_exit=False,
            on_error=lambda error: None,
        ) as ingestion:
            idle.append(_record(ingestion, events))
            ingestion.close(timeout=0)  # nowhere to deliver: reported (and ignored) at once
    busy: list[float] = []
    with Server("--validation-workers", "2") as server:
        assert server.token is not None
        for run in range(size["runs"]):
            events = usage_events(n, f"record-busy-{run}")
            with Ingestion(
                server.token, base_url=server.url, max_queue_size=n, flush_at_exit=False
            ) as ingestion:
                busy.append(_record(ingestion, events))
                assert ingestion.flush(300)
    polar_default = [
        _peer("record", DEAD_URL, "t", 10_000, {})["events_per_s"] for _ in range(size["peer_runs"])
    ]
    polar_tuned = [
        _peer("record", DEAD_URL, "t", n, {**POLAR_TUNED, "max_queue_size": n})["events_per_s"]
        for _ in range(size["peer_runs"])
    ]
    median = statistics.median(idle)
    return {
        "metrics": [
            metric("record(), idle senders (median)", median, "events/s", ">=", TARGET_RECORD),
            metric(
                "record(), while delivering to meterline (median)",
                statistics.median(busy),
                "events/s",
            ),
            metric(
                "polar-sdk Ingestion.ingest(), defaults (median)",
                statistics.median(polar_default),
                "events/s",
            ),
            metric(
                "polar-sdk Ingestion.ingest(), tuned (median)",
                statistics.median(polar_tuned),
                "events/s",
            ),
        ],
        "details": {
            "events_per_run": n,
            "idle_runs": [round(x) for x in idle],
            "while_delivering_runs": [round(x) for x in busy],
            "polar_sdk": POLAR_SDK,
            "polar_default_runs": [round(x) for x in polar_default],
            "polar_default_events_per_run": 10_000,
            "polar_tuned_runs": [round(x) for x in polar_tuned],
            "polar_tuned_options": {**POLAR_TUNED, "max_queue_size": n},
        },
    }


def sdk_deliver(quick: bool = False) -> dict[str, Any]:
    """Events recorded by the SDK reach a local meterline at ≥ 50,000 events/s."""
    size = QUICK if quick else FULL
    n = size["n"]
    ours: list[float] = []
    record_rates: list[float] = []
    with Server() as server:
        assert server.token is not None
        for run in range(size["runs"]):
            events = usage_events(n, f"deliver-{run}")
            before = server.total_count()
            errors: list[Exception] = []
            with Ingestion(
                server.token,
                base_url=server.url,
                max_queue_size=n,
                on_error=errors.append,
                flush_at_exit=False,
            ) as ingestion:
                started = time.perf_counter()
                for event in events:
                    ingestion.ingest(event)
                recorded = time.perf_counter()
                assert ingestion.flush(600)
                elapsed = time.perf_counter() - started
            assert not errors, errors[0]
            assert server.total_count() - before == n
            ours.append(n / elapsed)
            record_rates.append(n / (recorded - started))

        before = server.total_count()
        default = _peer(
            "window", server.url, server.token, 10_000, {}, window=size["window"], base=before
        )
        polar_default = default["delivered"] / default["seconds"]
        polar_tuned: list[float] = []
        for _ in range(size["peer_runs"]):
            before = server.total_count()
            tuned = _peer(
                "deliver",
                server.url,
                server.token,
                n,
                {**POLAR_TUNED, "max_queue_size": n},
                base=before,
            )
            polar_tuned.append(n / tuned["seconds"])
    median = statistics.median(ours)
    tuned_median = statistics.median(polar_tuned)
    return {
        "metrics": [
            metric(
                "delivered to local meterline (median)", median, "events/s", ">=", TARGET_DELIVER
            ),
            metric("polar-sdk Ingestion, defaults", polar_default, "events/s"),
            metric("polar-sdk Ingestion, tuned (median)", tuned_median, "events/s"),
            metric("ratio to polar-sdk tuned", median / tuned_median, "x"),
        ],
        "details": {
            "events_per_run": n,
            "runs": [round(x) for x in ours],
            "record_rates_in_those_runs": [round(x) for x in record_rates],
            "sdk_settings": "defaults (batches of 2,000 / 4 MiB, linger 0.5 s, 8 in flight)",
            "polar_sdk": POLAR_SDK,
            "polar_default": default,
            "polar_tuned_runs": [round(x) for x in polar_tuned],
            "polar_tuned_options": {**POLAR_TUNED, "max_queue_size": n},
        },
    }


def total_events(url: str, token: str) -> int:
    """How many events the server holds (`GET /v1/events/?limit=1`)."""
    headers = {"Authorization": f"Bearer {token}"}
    answer = httpx.get(f"{url}/v1/events/", params={"limit": 1}, headers=headers, timeout=60)
    return int(answer.json()["pagination"]["total_count"])


def wait_for_count(url: str, token: str, target: int, timeout: float) -> float:
    """Poll the server's event count until it reaches `target`; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if total_events(url, token) >= target:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"the server did not reach {target} events in {timeout} s")
