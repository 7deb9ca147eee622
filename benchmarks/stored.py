"""A data dir holding many events, built fast, for the benchmarks of a core that has them
(`restart`, `backup_increment`, `memory_10m`).

The events are loadgen's realistic LLM usage events as ingest validates them (`to_table`), a few
distinct batches built once and applied again and again with new external ids, customers moved
round `customers` (Zipf-like usage within each batch) and timestamps spread over the last `days`
days in ingestion order (up to an hour late, as live ingest sees them): each batch an
`IngestJob` through the store's writer, as an ingest request of that many events is applied,
into the `meterline up` data dir's database, with the 10 meters of `benchmarks.meters` and the
ledger. It runs in a process of its own (`build`), so that what it holds in memory is its own:
its peak RSS is the engine's applying every event, and the benchmark's process stays small.

    python -m benchmarks.stored DATA_DIR EVENTS CUSTOMERS DAYS   # prints the build's figures
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from benchmarks.common import memory_kib
from benchmarks.ingest_http import LoadGenerator
from benchmarks.loadgen import make_event
from benchmarks.meters import create_meters
from benchmarks.server import Server, served_organization
from meters.events import EventRules, parse_ingest_body, to_table
from meters.times import now_us
from tests import deadline
from tests.deadline import wait_for

_BUILT: dict[tuple[int, int, float], tuple[Path, dict[str, Any]]] = {}
BATCH = 50_000
START_SECONDS = 1800.0  # a first start on a data dir of many events
CHUNK = 100  # requests of 1,000 events the load generator builds and sends at a time
TEMPLATES = 4
# Past either, the build stops there (`complete` false, `stopped` says why): 8.5 M events took 35
# minutes and 11 GiB here at 982c356 (4,500 events/s on a loaded day, RSS growing with events).
RSS_CAP_MIB = 6_144
BUDGET_SECONDS = 2_700
LATE_US = 3_600_000_000  # an event arrives up to an hour after its timestamp
DATABASE = "meterline.duckdb"


def build(data_dir: Path, events: int, customers: int, days: float) -> dict[str, Any]:
    """`data_dir` (new or empty) holding `events` events of `customers` customers: the build's
    figures (seconds, events/s, peak RSS of the building process, the organization's id)."""
    return built_apart("benchmarks.stored", data_dir, events, customers, days)


def built_apart(module: str, data_dir: Path, *args: object) -> dict[str, Any]:
    """The figures `python -m module data_dir args...` prints last (a JSON line), building a
    data dir in a process of its own: its memory and its DuckDB are not the benchmark's."""
    done = subprocess.run(
        [sys.executable, "-m", module, *map(str, (data_dir, *args))],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,  # its progress goes to stderr, as this process's
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building {data_dir} with {module} failed (exit {done.returncode})")
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def pristine(events: int, customers: int, days: float) -> tuple[Path, dict[str, Any]]:
    """A data dir built once per process for each size (and deleted as the process ends): the
    benchmarks of one run that need the same one share it; each copies it (`copy`) before
    changing it. The build's figures with it."""
    key = (events, customers, days)
    if key not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix="meterline-stored-"))
        atexit.register(shutil.rmtree, root, True)
        print(f"   building a data dir of {events:,} events", flush=True)
        figures = build(root / "data", events, customers, days)
        print(
            f"   built in {figures['seconds']:.0f} s ({figures['events_per_s']:,} events/s),"
            f" peak RSS {figures['peak_rss_mib']:,.0f} MiB",
            flush=True,
        )
        _BUILT[key] = (root / "data", figures)
    return _BUILT[key]


@contextlib.contextmanager
def serving(data_dir: Path, *args: str, command: str = "up") -> Iterator[Server]:
    """`meterline up` (or `command`) on `data_dir`, given time for a first start on many events;
    stopped (SIGTERM) afterwards."""
    with deadline.budget(START_SECONDS):
        server = Server(*args, command=command, data_dir=data_dir).start()
    with contextlib.ExitStack() as stack:
        stack.push(server)  # its exit (a stop), its enter (a start) done already
        yield server


def add_events(server: Server, events: int) -> dict[str, Any]:
    """`events` more events over HTTP, in requests of 1,000, until the API counts them."""
    expected = server.total_count() + events
    generator = LoadGenerator(server)
    started = time.perf_counter()
    try:
        sent = 0
        for first in range(0, events // 1_000, CHUNK):
            batches = min(CHUNK, events // 1_000 - first)
            found = generator.run(f"added{first}", batches, seed=first)
            if found["errors"]:
                raise RuntimeError(f"ingest errors: {found['error_samples']}")
            sent += found["events"]
    finally:
        generator.close()
    with deadline.budget(START_SECONDS):
        wait_for(f"the API to count {expected:,} events", lambda: server.total_count() >= expected)
    seconds = time.perf_counter() - started
    print(f"   {sent:,} events added in {seconds:.0f} s", flush=True)
    return {"events": sent, "seconds": round(seconds, 1)}


def copy(source: Path, into: Path) -> float:
    """`source` copied to the new folder `into`; the seconds it took."""
    started = time.perf_counter()
    shutil.copytree(source, into)
    return round(time.perf_counter() - started, 2)


def data_dir_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())


def _templates(customers: int, count: int) -> list[tuple[pa.Table, np.ndarray]]:
    """Validated batches and their customers' indices, built once."""
    rng = random.Random(61)
    weights = list(itertools.accumulate(1 / (k + 1) ** 0.8 for k in range(customers)))
    now = datetime.now(UTC)
    found = []
    for t in range(count):
        who = rng.choices(range(customers), cum_weights=weights, k=BATCH)
        parts = []
        for lo in range(0, BATCH, 5_000):  # a request's size at a time: a small peak of memory
            events = [make_event(rng, f"t{t}-{i}", "c", now) for i in range(lo, lo + 5_000)]
            body = orjson.loads(orjson.dumps({"events": events}))
            parts.append(to_table(parse_ingest_body(body, now=now_us(), rules=EventRules())))
        found.append((pa.concat_tables(parts).combine_chunks(), np.array(who, dtype=np.int64)))
    return found


def _batches(events: int, customers: int, days: float) -> Any:
    """Batches of new ids, customers and times, from the templates."""
    templates = _templates(customers, TEMPLATES)
    schema = templates[0][0].schema
    columns = {n: schema.get_field_index(n) for n in ("external_id", "external_customer_id")}
    stamp = schema.get_field_index("timestamp")
    names = np.array([f"cust_{k:06d}" for k in range(customers)], dtype=object)
    end = now_us()
    start = end - int(days * 86_400_000_000)
    step = (end - start) / events
    rng = np.random.default_rng(61)
    for b, first in enumerate(range(0, events, BATCH)):
        size = min(BATCH, events - first)
        table, who = templates[b % len(templates)]
        table = table.slice(0, size)
        moved = (who[:size] + b * 7_919) % customers  # every customer has a share over batches
        ingested = start + (first + np.arange(size)) * step
        late = rng.integers(0, LATE_US, size) if days else np.zeros(size, np.int64)
        times = np.maximum(ingested - late, start).astype(np.int64)
        ids = [f"s{first + i}" for i in range(size)]
        table = table.set_column(columns["external_id"], "external_id", pa.array(ids, pa.string()))
        table = table.set_column(
            columns["external_customer_id"],
            "external_customer_id",
            pa.array(names[moved], pa.string()),
        )
        yield table.set_column(stamp, "timestamp", pa.array(times, schema.field("timestamp").type))


# Customers `cust_000000…` (the events' external customer ids) as the API stores them, in one
# statement: through the API's job, one at a time, each checks that its email and external id
# are unique, which takes longer as there are more (17 ms each at 50,000 here, 5 ms at none):
# 100,000 would take half an hour.
CUSTOMERS_SQL = """
INSERT INTO customers (id, organization_id, type, email, external_id, metadata, created_at,
    routing_key)
SELECT uuid(), $org::UUID, 'individual', 'c' || i || '@example.com',
    'cust_' || lpad(i::VARCHAR, 6, '0'), '{}', now(), 'ext:cust_' || lpad(i::VARCHAR, 6, '0')
FROM range($count) t(i)
"""


def _stop(started: float) -> str | None:
    """Why the build stops before its last event, if it must: the machine is shared, so a build
    neither takes more memory than `RSS_CAP_MIB` nor more time than `BUDGET_SECONDS`."""
    rss = memory_kib(os.getpid())["VmRSS"] / 1024
    if rss > RSS_CAP_MIB:
        return f"RSS {rss:,.0f} MiB, over the cap of {RSS_CAP_MIB:,} MiB"
    if time.perf_counter() - started > BUDGET_SECONDS:
        return f"over the budget of {BUDGET_SECONDS:,} s"
    return None


async def _apply(data_dir: Path, events: int, customers: int, days: float) -> dict[str, Any]:
    org = served_organization(data_dir)
    batches = _batches(events, customers, days)
    first = next(batches)  # the templates built
    before = memory_kib(os.getpid())["VmRSS"]
    started = time.perf_counter()
    applied = 0
    # The last flush of many events may outlast a read's usual timeout.
    async with Store(data_dir / DATABASE, read_timeout_seconds=3600) as store:
        await create_meters(store, org)
        made = time.perf_counter()
        await store.write(
            lambda tx: tx.con.execute(CUSTOMERS_SQL, {"org": org, "count": customers})
        )
        made = time.perf_counter() - made
        stopped = None
        for batch in itertools.chain([first], batches):
            result = await store.write(IngestJob(org, batch, now_us()), weight=batch.num_rows)
            applied += result.inserted
            if applied % 1_000_000 < BATCH:
                rate = applied / (time.perf_counter() - started)
                print(f"   built {applied:,} events ({rate:,.0f}/s)", file=sys.stderr, flush=True)
            stopped = _stop(started)
            if stopped is not None:
                print(f"   stopped at {applied:,} events: {stopped}", file=sys.stderr, flush=True)
                break
        await store.read(lambda con: None)  # every applied event stored
    seconds = time.perf_counter() - started
    return {
        "events": applied,
        "complete": applied == events,
        "stopped": stopped,
        "customers": customers,
        "days": days,
        "organization_id": org,
        "seconds": round(seconds, 1),
        "events_per_s": round(applied / seconds),
        "customers_seconds": round(made, 1),
        "peak_rss_mib": round(memory_kib(os.getpid())["VmHWM"] / 1024, 1),
        "rss_mib_before": round(before / 1024, 1),
        "bytes": data_dir_bytes(data_dir),
    }


if __name__ == "__main__":
    data_dir, events, customers, days = Path(sys.argv[1]), *map(int, sys.argv[2:4]), sys.argv[4]
    data_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(_apply(data_dir, events, customers, float(days)))))
