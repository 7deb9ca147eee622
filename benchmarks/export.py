"""The lakehouse export (issue 65): which table format, what exporting costs the core, and
exactly once through kills.

Hypotheses (issue 65's bars):
- Export keeps up with the core at its full rate on this machine: with `--export-to`, the
  core's events per core-second drop at most 10% (≥ 0.9× those without), and the export's lag
  stays bounded (`export_rate`).
- After 5 kill -9s of the exporting core during a 1 M-event run, the exported rows equal the
  API's totals for every customer and meter, and each acknowledged event is in the table once
  (`export_kills_1m`).
- The choice of format (`export_formats`): Delta Lake (`deltalake`) against Apache Iceberg
  (`pyiceberg`, a SQL catalog on SQLite), writing the same rows in the same commits, reading
  an exporter's position back, deleting voided events and reading everything. No bar: the
  figures behind the choice (docs/guides/export.md says why Delta).

    .venv/bin/python -m benchmarks.run export_rate        # --quick for a smoke run
    .venv/bin/python -m benchmarks.run export_kills_1m
    .venv/bin/python -m benchmarks.run export_formats

export_rate: a fresh `meterline up` per run, with and without `--export-to` (a fresh folder),
alternating which goes first, 3 runs each; each run sends 500,000 loadgen events over HTTP
(ingest_http's load generator: requests of 1,000, 8 in flight) and waits until the API counts
them all and, with export, until `/metrics` says no event waits (`meterline_export_lag_events`
0). Events per core-second = events / the server's CPU seconds (its threads, DuckDB's and the
export's) from the first request to 3 s after that moment (the segment merges its flushes
made due, in both kinds of run). The lag is sampled from `/metrics` every
0.2 s meanwhile; the bar is the ratio of the medians.

export_kills_1m: `meterline up --export-to DIR` with a count meter and a sum meter of
`_llm.total_tokens`; 1,000,000 loadgen events (1,000 customers) sent by 4 senders, each
request sent again until answered 200 (the same external ids), while the core is killed
(SIGKILL) 5 times, spread over the run, and started again on its data dir. Then, once the
export's lag is 0: each acknowledged external id is in the table exactly once, no other user
event is, and for every customer and both meters the API's quantity over the window equals
the same aggregate over the table's rows (read by deltalake's engine into Arrow, aggregated by
DuckDB).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pyarrow as pa

from aggregator.export.table import EventsTable, table_uri
from aggregator.store import export_reads
from benchmarks import loadgen
from benchmarks.common import metric
from benchmarks.ingest_http import LoadGenerator
from benchmarks.server import Server

RATE_BAR = 0.9  # events per core-second with export, against without
SETTLE_SECONDS = 3.0  # after the last event is stored (and exported), still counted
RATE = {"events": 500_000, "runs": 3}
RATE_QUICK = {"events": 50_000, "runs": 1}
KILLS = {"events": 1_000_000, "kills": 5, "senders": 4}
KILLS_QUICK = {"events": 60_000, "kills": 2, "senders": 4}
FORMATS = {"events": 1_000_000, "commit": 50_000, "deleted": 1_000}
FORMATS_QUICK = {"events": 100_000, "commit": 50_000, "deleted": 1_000}
BATCH = 1_000
WINDOW = {  # loadgen's events are of the last hour
    "interval": "day",
    "timezone": "UTC",
}
METERS = {
    "calls": {"func": "count"},
    "tokens": {"func": "sum", "property": "_llm.total_tokens"},
}


def _lag(server: Server) -> tuple[float, float]:
    """(`meterline_export_lag_events`, `_seconds`) from /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    found = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("meterline_export_lag_")
    }
    return found["meterline_export_lag_events"], found["meterline_export_lag_seconds"]


def _until(what: str, done: Callable[[], bool], timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


# --- export_rate -------------------------------------------------------------------------


def export_rate(quick: bool = False) -> dict[str, Any]:
    plan = RATE_QUICK if quick else RATE
    batches = plan["events"] // BATCH
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for r in range(plan["runs"]):
        order = ("without", "with") if r % 2 == 0 else ("with", "without")
        for kind in order:
            found = _rate_run(kind == "with", batches, seed=r)
            runs[kind].append(found)
            print(f"   {kind} export, run {r + 1}: {found}", flush=True)
    rate = {k: statistics.median(x["events_per_core_second"] for x in v) for k, v in runs.items()}
    ratio = rate["with"] / rate["without"]
    lag_max = max(x["lag_events_max"] for x in runs["with"])
    return {
        "metrics": [
            metric("events per core-second with export / without", ratio, "×", ">=", RATE_BAR),
            metric("events per core-second, without export", rate["without"], "events/s"),
            metric("events per core-second, with export", rate["with"], "events/s"),
            metric("export lag during the runs, max (events)", lag_max, "events"),
            metric(
                "export lag during the runs, max (seconds)",
                max(x["lag_seconds_max"] for x in runs["with"]),
                "s",
            ),
            metric(
                "export caught up after the last request (median)",
                statistics.median(x["caught_up_seconds"] for x in runs["with"]),
                "s",
            ),
        ],
        "details": {"plan": plan, "runs": runs},
    }


def _rate_run(export: bool, batches: int, seed: int) -> dict[str, Any]:
    lake = Path(tempfile.mkdtemp(prefix="meterline-lake-"))
    args = ("--export-to", str(lake)) if export else ()
    lags: list[tuple[float, float]] = []
    try:
        with Server(*args) as server:
            load = LoadGenerator(server)
            try:
                prepared = load.prepare(f"rate{seed}{int(export)}", batches, seed)
                cpu0 = server.cpu_all()
                started = time.perf_counter()
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.2):
                        lags.append(_lag(server))

                sampler = threading.Thread(target=sample, daemon=True)
                if export:
                    sampler.start()
                sent = load.go(prepared)
                sent_at = time.perf_counter()
                _until("the events stored", lambda: server.total_count() >= sent["events"])
                if export:
                    _until("the export to catch up", lambda: _lag(server)[0] == 0)
                    stop.set()
                    sampler.join()
                seconds = time.perf_counter() - started
                # Both kinds of run alike: the merges their flushes made due, and idle loops.
                time.sleep(SETTLE_SECONDS)
                cpu = server.cpu_all() - cpu0
            finally:
                load.close()
            rows = _exported_count(lake) if export else None
    finally:
        shutil.rmtree(lake, ignore_errors=True)
    return {
        "events": sent["events"],
        "http_events_per_s": sent["events_per_s"],
        "seconds": round(seconds, 2),
        "server_cpu_seconds": round(cpu, 2),
        "events_per_core_second": round(sent["events"] / cpu, 1),
        "caught_up_seconds": round(time.perf_counter() - sent_at, 2) if export else None,
        "lag_events_max": max((x[0] for x in lags), default=0.0),
        "lag_seconds_max": round(max((x[1] for x in lags), default=0.0), 2),
        "exported_rows": rows,
    }


def _exported_count(lake: Path) -> int:
    from deltalake import DeltaTable, QueryBuilder

    table = DeltaTable(table_uri(str(lake)))
    found = pa.table(QueryBuilder().register("e", table).execute("SELECT count(*) AS n FROM e"))
    return int(found.column("n")[0].as_py())


# --- export_kills_1m ---------------------------------------------------------------------


def export_kills_1m(quick: bool = False) -> dict[str, Any]:
    plan = KILLS_QUICK if quick else KILLS
    batches = plan["events"] // BATCH
    bodies = loadgen.make_bodies("kills", batches, BATCH, seed=65)
    data = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
    lake = data.parent / f"{data.name}-lake"
    args = ("--export-to", str(lake))
    server = Server(*args, data_dir=data).start()
    try:
        meters = _meters(server)
        acknowledged, server, seconds = _send_while_killing(server, bodies, plan, args)
        started = time.perf_counter()
        _until("the export to catch up", lambda: _lag(server)[0] == 0)
        caught_up = time.perf_counter() - started
        checked = _check_kills(server, lake, acknowledged, meters)
    finally:
        server.kill()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(lake, ignore_errors=True)
    print(f"   {checked}", flush=True)
    return {
        "metrics": [
            metric("events exported twice", checked["twice"], "events", "==", 0),
            metric("acknowledged events not exported", checked["missing"], "events", "==", 0),
            metric(
                "(customer, meter) totals the table and the API disagree on",
                checked["disagreeing"],
                "totals",
                "==",
                0,
            ),
            metric("kill -9s of the exporting core", plan["kills"], "kills"),
            metric("events acknowledged", len(acknowledged), "events"),
            metric("export caught up after the last kill's run", caught_up, "s"),
        ],
        "details": {"plan": plan, "send_seconds": round(seconds, 1), **checked},
    }


def _meters(server: Server) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {server.token}"}
    found = {}
    for name, aggregation in METERS.items():
        body = {"name": name, "filter": {"conjunction": "and", "clauses": []}}
        answer = httpx.post(
            f"{server.url}/v1/meters/", json={**body, "aggregation": aggregation}, headers=headers
        )
        answer.raise_for_status()
        found[name] = answer.json()["id"]
    return found


def _send_while_killing(
    server: Server, bodies: list[bytes], plan: dict[str, int], args: tuple[str, ...]
) -> tuple[list[str], Server, float]:
    """Every body sent until answered 200, by `senders` threads, while the core is killed
    `kills` times (at even shares of the bodies answered) and started again."""
    current = [server]
    token = server.token
    answered: list[int] = []
    lock = threading.Lock()
    kill_at = [len(bodies) * (k + 1) // (plan["kills"] + 1) for k in range(plan["kills"])]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    restarting = threading.Event()
    restarting.set()  # set: serving

    def send(index: int) -> None:
        while True:
            restarting.wait()
            try:
                answer = httpx.post(
                    f"{current[0].url}/v1/events/ingest",
                    content=bodies[index],
                    headers=headers,
                    timeout=30,
                )
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if answer.status_code == 200:
                with lock:
                    answered.append(index)
                return
            time.sleep(0.05)

    started = time.perf_counter()
    with ThreadPoolExecutor(plan["senders"]) as pool:
        futures = [pool.submit(send, i) for i in range(len(bodies))]
        for at in kill_at:
            _until(f"{at} requests answered", lambda a=at: len(answered) >= a)
            restarting.clear()
            current[0].kill()
            current[0] = Server(*args, data_dir=server.data_dir, port=server.port).start()
            restarting.set()
        for future in futures:
            future.result()
    seconds = time.perf_counter() - started
    acknowledged = [e["external_id"] for i in answered for e in orjson.loads(bodies[i])["events"]]
    return acknowledged, current[0], seconds


def _check_kills(
    server: Server, lake: Path, acknowledged: list[str], meters: dict[str, str]
) -> dict[str, Any]:
    from deltalake import DeltaTable, QueryBuilder

    table = DeltaTable(table_uri(str(lake)))
    rows = pa.table(
        QueryBuilder()
        .register("events", table)
        .execute(
            "SELECT external_id, external_customer_id, timestamp, llm_total_tokens FROM events"
            " WHERE source = 'user'"
        )
    )
    with duckdb.connect() as con:
        con.register("rows", rows)
        con.register("acked", pa.table({"external_id": acknowledged}))

        def one(sql: str) -> Any:
            return con.execute(sql).fetchall()[0]

        (twice,) = one(
            "SELECT count(*) FROM (SELECT external_id FROM rows GROUP BY 1 HAVING count(*) > 1)"
        )
        (missing,) = one("SELECT count(*) FROM acked ANTI JOIN rows USING (external_id)")
        (others,) = one("SELECT count(*) FROM rows ANTI JOIN acked USING (external_id)")
        lo, hi = one("SELECT min(timestamp), max(timestamp) FROM rows")
        totals = con.execute(
            "SELECT external_customer_id, count(*), sum(llm_total_tokens) FROM rows GROUP BY 1"
        ).fetchall()
    window = {
        **WINDOW,
        "start_timestamp": (lo - timedelta(days=1)).date().isoformat() + "T00:00:00Z",
        "end_timestamp": (hi + timedelta(days=1)).date().isoformat() + "T23:59:59Z",
    }
    headers = {"Authorization": f"Bearer {server.token}"}
    disagreeing: list[str] = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for customer, count, tokens in totals:
            for name, want in (("calls", count), ("tokens", tokens)):
                params = {**window, "external_customer_id": customer}
                got = client.get(f"/v1/meters/{meters[name]}/quantities", params=params)
                got.raise_for_status()
                if got.json()["total"] != want:
                    disagreeing.append(f"{customer} {name}: API {got.json()['total']} != {want}")
    return {
        "rows": rows.num_rows,
        "twice": int(twice),
        "missing": int(missing),
        "not_acknowledged_but_stored": int(others),
        "customers": len(totals),
        "disagreeing": len(disagreeing),
        "disagreeing_sample": disagreeing[:5],
    }


# --- export_formats ----------------------------------------------------------------------


def export_formats(quick: bool = False) -> dict[str, Any]:
    plan = FORMATS_QUICK if quick else FORMATS
    rows = _rows(plan["events"])
    deleted = random.Random(7).sample(rows.column("id").to_pylist(), plan["deleted"])
    folder = Path(tempfile.mkdtemp(prefix="meterline-formats-"))
    try:
        found = {
            "delta": _delta(folder / "delta", rows, plan["commit"], deleted),
            "iceberg": _iceberg(folder / "iceberg", rows, plan["commit"], deleted),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for name, figures in found.items():
        print(f"   {name}: {figures}", flush=True)
    metrics = []
    for name, figures in found.items():
        metrics += [
            metric(f"{name}: events written per second", figures["events_per_s"], "events/s"),
            metric(f"{name}: CPU per event written", figures["cpu_us_per_event"], "µs"),
            metric(f"{name}: an exporter's position read", figures["position_ms"], "ms"),
            metric(f"{name}: {plan['deleted']} voided events deleted", figures["delete_ms"], "ms"),
            metric(f"{name}: every row read into Arrow", figures["read_ms"], "ms"),
            metric(f"{name}: bytes per event stored", figures["bytes_per_event"], "B"),
        ]
    return {"metrics": metrics, "details": {"plan": plan, **found}}


def _rows(count: int) -> pa.Table:
    """`count` events as the export's rows: 3 organizations, 1,000 customers, 30 days."""
    rng = random.Random(65)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    organizations = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(3)]
    events = []
    for seq in range(1, count + 1):
        event = loadgen.make_event(rng, f"e{seq}", f"cust_{rng.randrange(1000):04d}", now)
        at = now - timedelta(seconds=rng.uniform(0, 30 * 86400))
        llm = event["metadata"]["_llm"]
        events.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "seq": seq,
                "organization_id": organizations[seq % 3],
                "day": at.date(),
                "name": event["name"],
                "source": "user",
                "timestamp": at,
                "ingested_at": now,
                "external_customer_id": event["external_customer_id"],
                "external_id": event["external_id"],
                "version": 1,
                "cost_amount": _decimal(event["metadata"]["_cost"]["amount"]),
                "cost_currency": "usd",
                **{f"llm_{k}": v for k, v in llm.items()},
                "metadata": orjson.dumps(event["metadata"]).decode(),
            }
        )
    return pa.Table.from_pylist(events, schema=export_reads.SCHEMA)


def _decimal(text: str) -> Any:
    from decimal import Decimal

    return Decimal(text).quantize(Decimal("1e-12"))


def _timed(job: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, what `job` returned)."""
    wall, cpu = time.perf_counter(), time.process_time()
    found = job()
    return time.perf_counter() - wall, time.process_time() - cpu, found


def _chunks(rows: pa.Table, size: int) -> list[pa.Table]:
    return [rows.slice(start, size) for start in range(0, rows.num_rows, size)]


def _delta(folder: Path, rows: pa.Table, commit: int, deleted: list[str]) -> dict[str, Any]:
    from deltalake import DeltaTable, QueryBuilder

    table = EventsTable(str(folder), "meterline/0/1")
    table.position()

    def write() -> None:
        for chunk in _chunks(rows, commit):
            table.append(chunk, int(chunk.column("seq")[-1].as_py()))

    def read() -> int:
        found = QueryBuilder().register("e", DeltaTable(table.uri)).execute("SELECT * FROM e")
        return pa.table(found).num_rows

    return _figures(folder, rows, write, table.position, lambda: table.delete(deleted), read)


def _iceberg(folder: Path, rows: pa.Table, commit: int, deleted: list[str]) -> dict[str, Any]:
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.expressions import In

    folder.mkdir(parents=True)
    catalog = SqlCatalog(
        "meterline", uri=f"sqlite:///{folder}/catalog.db", warehouse=f"file://{folder}"
    )
    catalog.create_namespace("export")
    table = catalog.create_table("export.events", schema=rows.schema)
    with table.update_spec() as spec:  # partitioned as the Delta table is
        spec.add_identity("organization_id")
        spec.add_identity("day")
    key = "meterline.position.meterline/0/1"

    def write() -> None:
        for chunk in _chunks(rows, commit):
            table.append(chunk, snapshot_properties={key: str(chunk.column("seq")[-1].as_py())})

    def position() -> int:
        # Iceberg keeps no id's position: the newest snapshot that says it, walking back.
        loaded = catalog.load_table("export.events")
        snapshot = loaded.current_snapshot()
        while snapshot is not None:
            if key in snapshot.summary.additional_properties:
                return int(snapshot.summary.additional_properties[key])
            parent = snapshot.parent_snapshot_id
            snapshot = None if parent is None else loaded.snapshot_by_id(parent)
        return 0

    def read() -> int:
        return catalog.load_table("export.events").scan().to_arrow().num_rows

    return _figures(folder, rows, write, position, lambda: table.delete(In("id", deleted)), read)


def _figures(
    folder: Path,
    rows: pa.Table,
    write: Callable[[], None],
    position: Callable[[], int],
    delete: Callable[[], Any],
    read: Callable[[], int],
) -> dict[str, Any]:
    wall, cpu, _ = _timed(write)
    position_s, _, found = _timed(position)
    assert found == rows.num_rows, found
    delete_s, _, _ = _timed(delete)
    read_s, _, read_rows = _timed(read)
    assert read_rows == rows.num_rows - 1_000 or read_rows < rows.num_rows, read_rows
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "events_per_s": round(rows.num_rows / wall, 1),
        "cpu_us_per_event": round(cpu / rows.num_rows * 1e6, 3),
        "write_seconds": round(wall, 2),
        "position_ms": round(position_s * 1000, 2),
        "delete_ms": round(delete_s * 1000, 1),
        "read_ms": round(read_s * 1000, 1),
        "rows_read": read_rows,
        "bytes_per_event": round(size / rows.num_rows, 1),
    }
