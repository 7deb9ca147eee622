"""What meters that depend on when events happened cost ingest: 10 meters of which 2 are
`latest` and `integral`, against today's 10, in one run.

Hypothesis: applying batches of 10,000 realistic events to 10 meters, two of them replaced by a
`latest` and an `integral` meter of the same properties, keeps ≥ 0.9× the events per CPU second
of the 10 meters of `benchmarks.meters` (whose two are `min` and `max`). Both organizations
share one store; each round applies one batch to each, in alternating order, with everything
ingest does for meters (`apply_meters`: contributions, ledger usage, balances in memory, rollup
and point deltas); the process's CPU time (the writer thread and DuckDB's) is measured inside
the job. The figure is the median over rounds of each round's ratio.

Command: `.venv/bin/python -m benchmarks.run timed_meters` (`--quick` for a smoke run).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from aggregator.store import Store
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.tables.meter_tables import create_job
from benchmarks.common import metric
from benchmarks.meters import METERS, ROLLUP_BATCH, _batch_new, apply_meters, realistic_events
from meters.definitions import MeterCreate
from meters.times import now_us

TARGET_RATIO = 0.9
# Today's 10 with min and max replaced by the aggregations of readings.
REPLACED = {"Smallest prompt": "latest", "Largest request": "integral"}
TIMED = tuple(
    {**m, "aggregation": {**m["aggregation"], "func": REPLACED[m["name"]]}}
    if m["name"] in REPLACED
    else m
    for m in METERS
)


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(4 if quick else 40))


async def _run(rounds: int) -> dict[str, Any]:
    tables = realistic_events(4, ROLLUP_BATCH, seed=11, tag="timed")
    orgs = {"today": str(uuid.uuid4()), "timed": str(uuid.uuid4())}
    cpu: dict[str, list[float]] = {name: [] for name in orgs}
    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp:
        async with Store(Path(tmp) / "timed.duckdb") as store:
            for name, definitions in (("today", METERS), ("timed", TIMED)):
                for m in definitions:
                    create = MeterCreate.model_validate(m)
                    job = create_job(orgs[name], create, now_us(), meter_id=str(uuid.uuid4()))
                    await store.write(job)
            seq = 1
            for i in range(-2, rounds):  # -2, -1: warm-up, untimed
                order = ("today", "timed") if i % 2 else ("timed", "today")
                for name in order:
                    batch = _batch_new(tables[i % len(tables)], orgs[name], seq)
                    seq += ROLLUP_BATCH
                    seconds = await store.write(_apply_job(store, batch, orgs[name]))
                    if i >= 0:
                        cpu[name].append(seconds)
    ratios = [t / s for t, s in zip(cpu["today"], cpu["timed"], strict=True)]
    rate = {name: ROLLUP_BATCH / statistics.median(seconds) for name, seconds in cpu.items()}
    return {
        "metrics": [
            metric("events per CPU second, today's 10 meters", rate["today"], "events/s"),
            metric("events per CPU second, 2 of 10 latest/integral", rate["timed"], "events/s"),
            metric("ratio (median of rounds)", statistics.median(ratios), "x", ">=", TARGET_RATIO),
        ],
        "details": {
            "rounds": rounds,
            "batch": ROLLUP_BATCH,
            "replaced": REPLACED,
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
        },
    }


def _apply_job(store: Store, batch: pa.Table, organization_id: str) -> Job[float]:
    """`apply_meters` as a writer job: the process's CPU seconds for it."""

    def job(tx: Tx) -> float:
        started = time.process_time()
        apply_meters(tx, batch, organization_id)
        return time.process_time() - started

    return job
