"""memory_10m: the peak resident memory of a core holding 10 M events of 100,000 customers with
10 meters.

Hypothesis: what a core holds in memory grows with its customers and meters, not with the events
it stores, so that its peak RSS at 10 M events, 100,000 customers and 10 meters is at most 2 GiB
(issue 61's bar), both while it applies them and while it serves.

Two processes are measured (VmHWM, `/proc/<pid>/status`):

- the one applying every event (`benchmarks.stored`: the 10 meters of `benchmarks.meters`, the
  100,000 customers, 10 M loadgen events over 30 days, applied in requests of 50,000
  through the store's writer in process); its RSS before the first event (Python, the
  libraries and its batch templates) is reported beside;
- `meterline up` started on a copy of that data dir, then asked one customer's quantities of a
  sum meter (31 days by day) for 200 customers, every customer's monthly totals of each of
  the 10 meters, 1,000 balance checks of as many customers, then sent 100,000 more events over
  HTTP (ingest_http's load generator), until the API counts them.

    .venv/bin/python -m benchmarks.run memory_10m   # --quick: 200,000 events
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import stored
from benchmarks.common import metric
from benchmarks.server import Server

TARGET_MIB = 2048.0  # issue 61's bar, and issue 81's: 2 GiB
FULL = {
    "events": 10_000_000,
    "customers": 100_000,
    "days": 30,
    "added": 100_000,
    "quantities": 200,
    "checks": 1_000,
}
QUICK = FULL | {"events": 200_000, "added": 10_000, "quantities": 20, "checks": 100}


def _mib(server: Server) -> dict[str, float]:
    found = server.memory_kib()
    return {"rss": round(found["VmRSS"] / 1024, 1), "peak": round(found["VmHWM"] / 1024, 1)}


def _reads(server: Server, plan: dict[str, Any]) -> dict[str, Any]:
    """The module docstring's reads; how long each kind took."""
    now = datetime.now(UTC)
    month = {
        "start_timestamp": (now - timedelta(days=31)).isoformat(),
        "end_timestamp": now.isoformat(),
    }
    spent: dict[str, float] = {}
    with server.client() as client:
        meters = client.get("/v1/meters/", params={"limit": 100}).json()["items"]
        tokens = next(m["id"] for m in meters if m["name"] == "Total tokens")
        started = time.perf_counter()
        for k in range(plan["quantities"]):
            customer = f"cust_{k * 4_999 % plan['customers']:06d}"
            answer = client.get(
                f"/v1/meters/{tokens}/quantities",
                params={**month, "interval": "day", "external_customer_id": customer},
            )
            answer.raise_for_status()
        spent["one_customer_quantities"] = time.perf_counter() - started
        started = time.perf_counter()
        for meter in meters:
            answer = client.get(
                f"/v1/meters/{meter['id']}/quantities", params={**month, "interval": "month"}
            )
            answer.raise_for_status()
        spent["all_customers_monthly"] = time.perf_counter() - started
        started = time.perf_counter()
        for k in range(plan["checks"]):
            customer = f"cust_{k * 7_919 % plan['customers']:06d}"
            answer = client.get(
                "/v1/customer-meters/check",
                params={"external_customer_id": customer, "meter_id": tokens, "units": 1},
            )
            answer.raise_for_status()
        spent["checks"] = time.perf_counter() - started
    return {k: round(v, 2) for k, v in spent.items()}


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    source, built = stored.pristine(plan["events"], plan["customers"], plan["days"])
    work = Path(tempfile.mkdtemp(prefix="meterline-memory-"))
    try:
        data_dir = work / "data"
        copied = stored.copy(source, data_dir)
        with stored.serving(data_dir) as server:
            started = _mib(server)
            reads = _reads(server, plan)
            after_reads = _mib(server)
            added = stored.add_events(server, plan["added"])
            final = _mib(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"   core: {started} after start, {after_reads} after reads, {final} at the end")
    return {
        "metrics": [
            metric("core serving: peak RSS", final["peak"], "MiB", "<=", TARGET_MIB),
            metric("core: RSS once started", started["rss"], "MiB"),
            metric("core: RSS after the reads", after_reads["rss"], "MiB"),
            metric(
                "applying the events in process: peak RSS",
                built["peak_rss_mib"],
                "MiB",
                "<=",
                TARGET_MIB,
            ),
            metric("same, before the first event", built["rss_mib_before"], "MiB"),
            # Fewer when the build stopped at its memory or time cap (`stored`).
            metric("events stored", built["events"], "events", "==", plan["events"]),
            metric("customers", plan["customers"], "customers"),
            metric("data dir", built["bytes"] / 2**20, "MiB"),
        ],
        "details": {
            "plan": plan,
            "build": built,
            "copy_seconds": copied,
            "core_mib": {"started": started, "after_reads": after_reads, "end": final},
            "reads_seconds": reads,
            "added": added,
        },
    }
