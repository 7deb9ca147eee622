"""void_1m: voiding a million events of one customer over HTTP, beside another tenant's ingest.

Hypothesis (issue 63's bar): `POST /v1/events/void` with a filter naming one customer of
1,000,000 events is done (its job, read at `GET /v1/events/void/{id}`, says so) within 30 s on
this machine, and another organization's ingest p99 meanwhile stays within 2x its p99 alone.

The data dir (built once per process, in a process of its own: `python -m benchmarks.voids
DATA_DIR BIG OTHERS DAYS`) is the `meterline up` organization with the 10 meters of
`benchmarks.meters`, 1,000 customers and one more, `big`: loadgen's events as ingest validates
them, `big`'s 1,000,000 among 1,000,000 of the others, interleaved, over the last 30 days in
ingestion order (up to an hour late), each batch an `IngestJob` through the store's writer
(`benchmarks.stored`'s way). Each run (3; `--quick`: 1, of 20,000 and 20,000 events) copies it,
serves it with `meterline up`, and has tenant B (an organization of its own: 50 requests/s of
100 events over 4 connections, `tests.tenants`) ingest alone for 5 s, then ingest while
`big`'s events are voided: from the POST until the job says it is done, polled every 100 ms.
B's p99 meanwhile is that of the requests B sent between the POST and the end; the ratio is
each run's over its own solo p99. After the run the server is stopped and the database read:
every one of `big`'s events voided, no other one, and each meter's rollups agreeing with its
events (`meters.check_rollups`).

    .venv/bin/python -m benchmarks.run void_1m     # --quick for a smoke run
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import numpy as np
import pyarrow as pa

from aggregator.store import IngestJob, Store
from benchmarks import stored
from benchmarks.backups import written_bytes
from benchmarks.common import metric, percentile
from benchmarks.meters import check_rollups, create_meters
from benchmarks.server import Server, served_organization
from meters.times import now_us
from tests import deadline, tenants
from tests.processes import new_org_token

TARGET_SECONDS = 30.0  # issue 63's bar
TARGET_RATIO = 2.0
FULL = {"runs": 3, "big": 1_000_000, "others": 1_000_000, "days": 30, "solo_seconds": 5.0}
QUICK = {"runs": 1, "big": 20_000, "others": 20_000, "days": 30, "solo_seconds": 2.0}
BIG = "big"
CUSTOMERS = 1_000
BATCH = 50_000
POLL_SECONDS = 0.1
WARM_SECONDS = 5.0
# B's requests: isolation's well-behaved tenant.
RATE, B_BATCH, CONNECTIONS = 50.0, 100, 4
VOID_BUDGET_SECONDS = 600.0  # a run that takes longer is stopped: the bar is 30 s


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    root = Path(tempfile.mkdtemp(prefix="meterline-voids-"))
    try:
        pristine = root / "pristine"
        built = build(pristine, plan["big"], plan["others"], plan["days"])
        print(
            f"   built {built['events']:,} events ({built['big']:,} of {BIG}) in"
            f" {built['seconds']:.0f} s",
            flush=True,
        )
        runs = []
        for i in range(int(plan["runs"])):
            data_dir = root / f"run{i}"
            shutil.copytree(pristine, data_dir)
            runs.append(_run(data_dir, plan, i))
            shutil.rmtree(data_dir, ignore_errors=True)
            r = runs[-1]
            print(
                f"   run {i + 1}: {r['voided']:,} voided in {r['void_seconds']:.1f} s;"
                f" B p99 {r['b_void']['p99_ms']:.1f} ms during, {r['b_solo']['p99_ms']:.1f} ms"
                f" alone ({r['ratio']:.2f}x)",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = statistics.median(r["void_seconds"] for r in runs)
    ratio = statistics.median(r["ratio"] for r in runs)
    wrong = max(r["checks"]["wrong"] for r in runs)
    metrics = [
        metric(
            f"void of {plan['big']:,} events, seconds (median of runs)",
            seconds,
            "s",
            "<=",
            TARGET_SECONDS,
        ),
        metric("void events/s", plan["big"] / seconds, "events/s"),
        metric("B p99 during the void / alone", ratio, "x", "<=", TARGET_RATIO),
        metric("B p99 alone", statistics.median(r["b_solo"]["p99_ms"] for r in runs), "ms"),
        metric(
            "B p99 during the void", statistics.median(r["b_void"]["p99_ms"] for r in runs), "ms"
        ),
        metric("B success during the void", min(r["b_void"]["success"] for r in runs), "ratio"),
        metric(
            "server CPU during the void",
            statistics.median(r["cpu_cores"] for r in runs),
            "cores",
        ),
        metric(
            "core's writes during the void",
            statistics.median(r["written_mib"] for r in runs),
            "MiB",
        ),
        metric("events wrongly voided or left, meters disagreeing", wrong, "count", "==", 0),
    ]
    return {"metrics": metrics, "details": {"plan": plan, "build": built, "runs": runs}}


def _run(data_dir: Path, plan: dict[str, Any], index: int) -> dict[str, Any]:
    b_token = new_org_token(data_dir, "victim")
    with deadline.budget(stored.START_SECONDS), Server(data_dir=data_dir) as server:
        # The first seconds after a start pay for its background work (merges, compaction).
        tenants.steady(server.url, b_token, f"warm{index}", seconds=WARM_SECONDS)
        solo = asyncio.run(_steady(server.url, b_token, f"solo{index}", plan["solo_seconds"]))
        cpu_before, written_before = server.cpu_all(), written_bytes(server.pid)
        voided = asyncio.run(_void_beside_b(server, b_token, index))
        cpu = server.cpu_all() - cpu_before
        written = written_bytes(server.pid) - written_before
    checks = _checked(data_dir, plan["big"])
    during = [r for r in voided["b"] if voided["started"] <= r[0] <= voided["ended"]]
    b_void, b_solo = _summary(during), _summary(solo)
    return {
        "voided": voided["job"]["voided"],
        "matched": voided["job"]["matched"],
        "void_seconds": round(voided["ended"] - voided["started"], 2),
        "answered_seconds": round(voided["answered"] - voided["started"], 3),
        "progress": voided["progress"],
        "b_solo": b_solo,
        "b_void": b_void,
        "ratio": round(b_void["p99_ms"] / b_solo["p99_ms"], 3),
        "cpu_cores": round(cpu / (voided["ended"] - voided["started"]), 2),
        "written_mib": round(written / 2**20, 1),
        "checks": checks,
    }


async def _void_beside_b(server: Server, b_token: str, index: int) -> dict[str, Any]:
    """The void of `big`'s events, from its POST until its job is done, while B ingests from
    a second before it until a second after."""
    stop = asyncio.Event()
    b = asyncio.create_task(_steady(server.url, b_token, f"void{index}", None, stop))
    await asyncio.sleep(1.0)
    headers = {"Authorization": f"Bearer {server.token}"}
    progress = []
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
        started = time.monotonic()
        body = {"filter": {"external_customer_id": BIG}, "reason": "benchmark"}
        answer = await client.post("/v1/events/void", json=body)
        answered = time.monotonic()
        if answer.status_code != 202:
            stop.set()
            await b
            raise RuntimeError(f"void refused: {answer.status_code} {answer.text}")
        job = answer.json()
        while not job["done"]:
            if time.monotonic() - started > VOID_BUDGET_SECONDS:
                stop.set()
                await b
                raise RuntimeError(f"the void took over {VOID_BUDGET_SECONDS:.0f} s: {job}")
            await asyncio.sleep(POLL_SECONDS)
            job = (await client.get(f"/v1/events/void/{job['id']}")).json()
            progress.append((round(time.monotonic() - started, 2), job["voided"]))
        ended = time.monotonic()
    await asyncio.sleep(1.0)
    stop.set()
    return {
        "job": job,
        "started": started,
        "answered": answered,
        "ended": ended,
        "progress": progress,
        "b": await b,
    }


async def _steady(
    url: str, token: str, tag: str, seconds: float | None, stop: asyncio.Event | None = None
) -> list[tuple[float, float, int]]:
    """Tenant B (`tenants.steady`'s requests, rate and connections), until `seconds` have
    passed or `stop` is set: (sent at, seconds to the answer, status) of each request."""
    answers: list[tuple[float, float, int]] = []
    started = time.monotonic()
    bodies = (tenants.events_body(f"{tag}-{i}", B_BATCH) for i in range(10**9))

    def over() -> bool:
        if stop is not None:
            return stop.is_set()
        assert seconds is not None
        return time.monotonic() - started >= seconds

    async def lane(offset: int) -> None:
        reader, writer = await tenants.connect(url)
        i = offset
        while not over():
            due = started + i / RATE
            i += CONNECTIONS
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            request = tenants.ingest_request(url, token, next(bodies))
            sent = time.monotonic()
            try:
                writer.write(request)
                status, headers, _ = await tenants.read_response(reader)
            except (OSError, asyncio.IncompleteReadError):
                status, headers = 0, {"connection": "close"}
            answers.append((sent, time.monotonic() - sent, status))
            if headers.get("connection") == "close":
                writer.close()
                reader, writer = await tenants.connect(url)
        writer.close()

    await asyncio.gather(*(lane(k) for k in range(CONNECTIONS)))
    return answers


def _summary(answers: list[tuple[float, float, int]]) -> dict[str, Any]:
    latencies = [seconds for _, seconds, _ in answers]
    ok = sum(1 for _, _, status in answers if status == 200)
    return {
        "requests": len(answers),
        "success": round(ok / len(answers), 4) if answers else 0.0,
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


def _checked(data_dir: Path, big: int) -> dict[str, Any]:
    """The stopped server's database: `big`'s events all voided, the others' none, each
    meter's rollups agreeing with its events."""
    with duckdb.connect(str(data_dir / stored.DATABASE)) as con:
        con.execute("SET TimeZone = 'UTC'")
        # Opened writable, the views are the store's own (`segments`).
        org = con.execute("SELECT DISTINCT organization_id::VARCHAR FROM meters").fetchall()[0][0]
        left = con.execute(
            "SELECT count(*) FROM events WHERE external_customer_id = ?", [BIG]
        ).fetchall()[0][0]
        voided = con.execute("SELECT count(*) FROM voided_events").fetchall()[0][0]
        rollups = check_rollups(con, org)
    wrong = int(left) + abs(int(voided) - big) + int(rollups["disagreeing"])
    return {"left": int(left), "voided": int(voided), "rollups": rollups, "wrong": wrong}


# ---- the data dir ---------------------------------------------------------------------------


def build(data_dir: Path, big: int, others: int, days: float) -> dict[str, Any]:
    """`data_dir` holding `big` events of customer `big` among `others` of 1,000 others: the
    build's figures (in a process of its own, `stored.build`'s way)."""
    return stored.built_apart("benchmarks.voids", data_dir, big, others, days)


async def _apply(data_dir: Path, big: int, others: int, days: float) -> dict[str, Any]:
    org = served_organization(data_dir)
    templates = stored._templates(CUSTOMERS, 2)
    schema = templates[0][0].schema
    columns = {n: schema.get_field_index(n) for n in ("external_id", "external_customer_id")}
    stamp = schema.get_field_index("timestamp")
    names = np.array([f"cust_{k:06d}" for k in range(CUSTOMERS)], dtype=object)
    total = big + others
    end = now_us()
    start = end - int(days * 86_400_000_000)
    step = (end - start) / total
    rng = np.random.default_rng(63)
    started = time.perf_counter()
    async with Store(data_dir / stored.DATABASE, read_timeout_seconds=3600) as store:
        await create_meters(store, org)
        await store.write(
            lambda tx: tx.con.execute(stored.CUSTOMERS_SQL, {"org": org, "count": CUSTOMERS})
        )
        await store.write(
            lambda tx: tx.con.execute(
                "INSERT INTO customers (id, organization_id, type, email, external_id, metadata,"
                " created_at, routing_key) VALUES (uuid(), ?::UUID, 'individual',"
                " 'big@example.com', ?, '{}', now(), ?)",
                [org, BIG, f"ext:{BIG}"],
            )
        )
        # Exactly `big` of the events are big's, spread evenly among the others'.
        chosen = np.zeros(total, dtype=bool)
        chosen[rng.choice(total, size=big, replace=False)] = True
        for b, first in enumerate(range(0, total, BATCH)):
            size = min(BATCH, total - first)
            table, who = templates[b % len(templates)]
            table = table.slice(0, size)
            customers = np.where(
                chosen[first : first + size], BIG, names[(who[:size] + b * 7_919) % CUSTOMERS]
            )
            ingested = start + (first + np.arange(size)) * step
            late = rng.integers(0, stored.LATE_US, size)
            times = np.maximum(ingested - late, start).astype(np.int64)
            ids = pa.array([f"v{first + i}" for i in range(size)], pa.string())
            table = table.set_column(columns["external_id"], "external_id", ids)
            table = table.set_column(
                columns["external_customer_id"],
                "external_customer_id",
                pa.array(customers.tolist(), pa.string()),
            )
            table = table.set_column(
                stamp, "timestamp", pa.array(times, schema.field("timestamp").type)
            )
            await store.write(IngestJob(org, table, now_us()), weight=size)
        await store.read(lambda con: None)  # every applied event stored
    return {
        "events": total,
        "big": big,
        "customers": CUSTOMERS + 1,
        "days": days,
        "seconds": round(time.perf_counter() - started, 1),
        "bytes": stored.data_dir_bytes(data_dir),
    }


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    big_, others_, days_ = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(asyncio.run(_apply(folder, big_, others_, days_))))
