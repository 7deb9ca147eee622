"""core_apply: the core's write path, in process, with the meters and the ledger on.

An in-process `Store` with the 10 benchmark meters (count, sum, avg, min, max, unique among
them) and the ledger; loadgen's LLM usage events over 10,000 customers (Zipf-like), batches of
20,000 applied as `IngestJob`s through the writer and timed until the flusher has stored them
all, 1% of each batch repeating an external id of the batch before (duplicates the store must
drop). The reference, in the same run: DuckDB alone inserting the same Arrow batches (the
events' columns, no index, no meters) into a table of its own file, one commit per batch.
Three runs of each, alternating; medians. CPU is the process's (DuckDB's threads included):
events per core-second.

Command: `python -m benchmarks.run core_apply`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from benchmarks.common import metric
from benchmarks.loadgen import make_event
from benchmarks.meters import create_meters
from meters.events import EventRules, parse_ingest_body, to_table
from meters.times import now_us

TARGET_EVENTS_PER_S = 300_000
TARGET_RATIO = 0.7  # issue 61's bar
# Issue 61's bar, in an --against run of the engine before it (5dc57ca).
AGAINST_PER_CORE = 2.5
CUSTOMERS = 10_000
BATCH = 20_000
DUPLICATES = 0.01
FULL = {"batches": 50, "distinct": 4, "runs": 3}
QUICK = {"batches": 6, "distinct": 2, "runs": 1}
ORG = "6d4c4b4e-5f5a-4c43-9a6c-1c7e0f3b2a10"


def run(quick: bool = False) -> dict[str, Any]:
    """The core applies ≥ 300,000 events/s with 10 meters and the ledger, ≥ 0.7× DuckDB alone
    inserting the same batches."""
    plan = QUICK if quick else FULL
    batches = batches_for(quick)
    events = sum(b.num_rows for b in batches)
    ours: list[dict[str, float]] = []
    alone: list[dict[str, float]] = []
    for i in range(plan["runs"]):
        ours.append(asyncio.run(_meterline(batches)))
        alone.append(_duckdb_alone(batches))
        print(
            f"   run {i + 1}: meterline {events / ours[-1]['seconds']:,.0f} events/s"
            f" ({ours[-1]['cores']:.2f} cores), DuckDB alone"
            f" {events / alone[-1]['seconds']:,.0f} events/s",
            flush=True,
        )
    rate = statistics.median(events / r["seconds"] for r in ours)
    reference = statistics.median(events / r["seconds"] for r in alone)
    per_core = statistics.median(events / r["cpu"] for r in ours)
    return {
        "metrics": [
            metric(
                "events/s applied (10 meters + ledger, median)",
                rate,
                "events/s",
                ">=",
                TARGET_EVENTS_PER_S,
            ),
            metric("DuckDB alone inserting the same batches (median)", reference, "events/s"),
            metric("ratio to DuckDB alone", rate / reference, "x", ">=", TARGET_RATIO),
            metric("events per core-second", per_core, "events", against=(">=", AGAINST_PER_CORE)),
            metric("CPU (median)", statistics.median(r["cores"] for r in ours), "cores"),
            metric(
                "duplicates dropped, fewest of the runs",
                min(r["duplicates"] for r in ours),
                "events",
                "==",
                int(BATCH * DUPLICATES) * (len(batches) - 1),
            ),
        ],
        "details": {
            "events_per_run": events,
            "batch": BATCH,
            "customers": CUSTOMERS,
            "duplicate_share": DUPLICATES,
            "meterline_runs": ours,
            "duckdb_alone_runs": alone,
        },
    }


def batches_for(quick: bool = False) -> list[pa.Table]:
    """The batches a run applies (validated once, untimed)."""
    plan = QUICK if quick else FULL
    return list(_batches(_templates(plan["distinct"]), plan["batches"]))


def per_core_second(batches: list[pa.Table]) -> float:
    """One run's events applied per CPU second (what `core_apply` reports, for other
    benchmarks to measure in their own run)."""
    result = asyncio.run(_meterline(batches))
    return sum(b.num_rows for b in batches) / result["cpu"]


def _templates(distinct: int) -> list[pa.Table]:
    """Validated batches (the ingest rules, Arrow columns), built once, untimed."""
    rng = random.Random(11)
    customers = [f"cust_{k:05d}" for k in range(CUSTOMERS)]
    weights = list(itertools.accumulate(1 / (k + 1) ** 0.8 for k in range(CUSTOMERS)))
    now = datetime.now(UTC)
    tables = []
    for b in range(distinct):
        who = rng.choices(customers, cum_weights=weights, k=BATCH)
        body = {"events": [make_event(rng, f"t{b}-{i}", who[i], now) for i in range(BATCH)]}
        events = parse_ingest_body(
            orjson.loads(orjson.dumps(body)), now=now_us(), rules=EventRules()
        )
        tables.append(to_table(events))
    return tables


def _batches(templates: list[pa.Table], count: int) -> Any:
    """`count` batches of fresh external ids, but the first 1% of each after the first repeats
    ids the batch before stored (its next 1%)."""
    column = templates[0].schema.get_field_index("external_id")
    repeated = int(BATCH * DUPLICATES)
    for b in range(count):
        ids = [f"b{b - 1}-{i}" for i in range(repeated, 2 * repeated)] if b else []
        ids += [f"b{b}-{i}" for i in range(len(ids), BATCH)]
        table = templates[b % len(templates)]
        yield table.set_column(column, "external_id", pa.array(ids, pa.string()))


async def _meterline(batches: list[pa.Table]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="meterline-bench-core-") as tmp:
        async with Store(Path(tmp) / "core.duckdb") as store:
            await create_meters(store, ORG)
            duplicates = 0
            cpu, started = time.process_time(), time.perf_counter()
            for batch in batches:
                result = await store.write(IngestJob(ORG, batch, now_us()), weight=batch.num_rows)
                duplicates += result.duplicates
            await store.read(lambda con: None)  # until every applied event is stored
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "cores": cpu / seconds, "duplicates": duplicates}


def _duckdb_alone(batches: list[pa.Table]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="meterline-bench-core-") as tmp:
        con = duckdb.connect(str(Path(tmp) / "alone.duckdb"))
        con.register("_first", batches[0])
        con.execute("CREATE TABLE events AS SELECT * FROM _first LIMIT 0")
        con.unregister("_first")
        cpu, started = time.process_time(), time.perf_counter()
        for batch in batches:
            con.register("_batch", batch)
            con.execute("BEGIN")
            con.execute("INSERT INTO events SELECT * FROM _batch")
            con.execute("COMMIT")
            con.unregister("_batch")
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        con.close()
    return {"seconds": seconds, "cpu": cpu, "cores": cpu / seconds}
