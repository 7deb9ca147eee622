"""Meters: HTTP ingest with live rollups, rollup update throughput, backfill and quantities.

Four benchmarks, each runnable alone by name (`.venv/bin/python -m benchmarks.run NAME`, add
`--quick` for a smoke run). All use the same 10 meters (`METERS`: count, sum, avg, min, max and
unique aggregations, filters on name, `_llm.model` and metadata) over loadgen's LLM usage events.

ingest_http_meters: ingest_http (same server, load generator, batches and runs) with the 10
meters created over HTTP before the warm-up, so every ingest transaction also updates 10 meters'
rollups. A no-meter ingest_http run with the same number of batches per run goes first, in the
same process, for the ratio. After the stop, every meter's quantity over all the stored events
is computed from its rollups (`quantities.exact_range`) and straight from the events (the
meter's SQL aggregate): they must agree.

rollup_update: no HTTP, an in-process `Store` on a temp file with the 10 meters (`create_job`).
Realistic events (loadgen bodies, validated by the ingest rules, `to_table`, plus the columns
ingest adds) are built once, untimed, and applied over and over (the rollups' keys then exist:
the common case, ingest's timestamps being the last hour). What is timed, per batch of
`ROLLUP_BATCH` events: exactly the work ingest adds for meters inside its transaction, i.e.
`apply_meters`: every meter's contribution and the ledger's usage (`rollups.evaluate`), the
balances in memory, and what a flush stores (the rollups' files, the ledger's deltas), run as a
writer job.
events/s = events / sum of those times. Not timed: the commit (the commit time of these
rollup-only transactions is reported beside). Cross-check: the same events ingested with
`IngestJob` (one job = one transaction per batch, commit included) into a store with the 10
meters and into one without, interleaved; the difference per event is the meters' marginal
cost as ingest sees it.

quantities_10m: 10 million synthetic events (`LOAD_SQL`: the columns ingest writes, metadata
JSON text shaped exactly like ingest's, 10,000 customers with skewed usage, 60 days, timestamps
following ingestion order as live ingest makes them) inserted with SQL in writer jobs of
`LOAD_CHUNK` rows; then one meter (sum of `_llm.total_tokens`) is created and its backfill is
run step by step (`backfill_step_job`, the Backfiller's chunk) to completion and timed. Then
quantities latency in-process (`store.read(compute, ...)`): one customer, 31 daily buckets, and
every customer's monthly totals over the whole range; then the same over HTTP from a real
`meterline up` on the same data dir (smaller samples). If the load takes longer than
`LOAD_BUDGET_SECONDS`, it stops there and the results say how many events were loaded.
quantities_1m is the same at 1 million events: the curve's other point.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import orjson
import pyarrow as pa

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.engine.balances import BYTES_PER_SLOT
from aggregator.store.engine.catalog import BYTES_PER_CUSTOMER
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering import rollups
from aggregator.store.metering.meter_sql import aggregate_sql, contribution_sql, meter_events_sql
from aggregator.store.tables.meter_tables import backfill_step_job, create_job
from aggregator.store.tables.quantities import Scope, compute, exact_range, reduce
from benchmarks import ingest_http, loadgen
from benchmarks.common import memory_kib, metric, percentile
from benchmarks.server import Server, served_organization
from meters.definitions import MeterCreate
from meters.events import EventRules, parse_ingest_body, to_table
from meters.periods import Interval
from meters.times import EPOCH, now_us

Con = duckdb.DuckDBPyConnection
UTC_ZONE = ZoneInfo("UTC")
DAY_US = 86_400_000_000


def _clause(prop: str, operator: str, value: str | int | bool) -> dict[str, Any]:
    return {"property": prop, "operator": operator, "value": value}


def _meter(
    name: str, func: str, prop: str | None = None, clauses: tuple[dict[str, Any], ...] = ()
) -> dict[str, Any]:
    aggregation = {"func": func} if prop is None else {"func": func, "property": prop}
    return {
        "name": name,
        "filter": {"conjunction": "and", "clauses": list(clauses)},
        "aggregation": aggregation,
    }


# Properties every loadgen event carries (see loadgen.make_event).
METERS: tuple[dict[str, Any], ...] = (
    _meter("LLM requests", "count"),
    _meter("Total tokens", "sum", "_llm.total_tokens"),
    _meter("Input tokens", "sum", "_llm.input_tokens"),
    _meter("Average tokens per request", "avg", "_llm.total_tokens"),
    _meter("Smallest prompt", "min", "_llm.input_tokens"),
    _meter("Largest request", "max", "_llm.total_tokens"),
    _meter("Models used", "unique", "_llm.model"),
    _meter("LLM cost", "sum", "_cost.amount"),
    _meter("GPT tokens", "sum", "_llm.total_tokens", (_clause("_llm.model", "like", "gpt"),)),
    _meter(
        "Streamed chat completions",
        "count",
        None,
        (_clause("name", "eq", "llm_completion"), _clause("streamed", "eq", True)),
    ),
)


def realistic_events(batches: int, batch_size: int, seed: int, tag: str) -> list[pa.Table]:
    """Loadgen's request bodies as ingest stores them: validated by the ingest rules, as Arrow
    columns (`to_table`)."""
    tables = []
    for body in loadgen.make_bodies(tag, batches, batch_size, seed):
        events = parse_ingest_body(orjson.loads(body), now=now_us(), rules=EventRules())
        tables.append(to_table(events))
    return tables


def check_rollups(con: Con, organization_id: str) -> dict[str, Any]:
    """Each meter's quantity over all stored events, from its rollups (plus the range's edges
    from events, as `/quantities` does) and straight from the events: they must agree."""
    lo, hi = con.execute(
        "SELECT min(epoch_us(timestamp)), max(epoch_us(timestamp)) FROM events"
        " WHERE organization_id = ?::UUID",
        [organization_id],
    ).fetchall()[0]
    meters = []
    for meter in meters_of(con, [organization_id]):
        started = time.perf_counter()
        from_rollups = reduce(exact_range(con, Scope(meter, None), lo, hi), meter, 0, None)
        rollup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        from_events = _from_events(con, meter)
        meters.append(
            {
                "name": meter.name,
                "from_rollups": from_rollups,
                "from_events": from_events,
                "agree": math.isclose(from_rollups, from_events, rel_tol=1e-9, abs_tol=1e-9),
                "rollups_seconds": round(rollup_seconds, 4),
                "events_scan_seconds": round(time.perf_counter() - started, 4),
            }
        )
    return {"meters": meters, "disagreeing": sum(not m["agree"] for m in meters)}


def _from_events(con: Con, meter: MeterRow) -> float:
    in_meter, in_meter_params = meter_events_sql(meter.filter, meter.aggregation)
    value, value_params = contribution_sql(meter.aggregation)
    row = con.execute(
        f"SELECT {aggregate_sql(meter.aggregation)} FROM (SELECT {value} AS contribution"
        f" FROM events WHERE organization_id = ?::UUID AND {in_meter})",
        [*value_params, meter.organization_id, *in_meter_params],
    ).fetchall()[0]
    return float(row[0])


async def create_meters(store: Store, organization_id: str) -> list[MeterRow]:
    return [
        await store.write(
            create_job(
                organization_id, MeterCreate.model_validate(m), now_us(), meter_id=str(uuid.uuid4())
            )
        )
        for m in METERS
    ]


def _rss_mib() -> float:
    return round(memory_kib(os.getpid())["VmRSS"] / 1024, 1)


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 2)


# ---- ingest_http_meters ---------------------------------------------------------------------


TARGET_METERS_RATIO = 0.85  # issue 61's bar: with the 10 meters / without, in the same run


def ingest_http_meters(quick: bool = False) -> dict[str, Any]:
    """HTTP ingest with 10 active meters keeps ≥ 100,000 events/s and ≥ 0.85× the same
    ingest without meters, and their rollups are exact.

    Hypothesis: with 10 meters of mixed aggregations (rollups updated in each ingest
    transaction), one `meterline up` still accepts ≥ 100,000 events/s over HTTP, with zero
    errors and nothing lost, and each meter's rollups agree with its events.
    """
    print("   -- without meters (baseline, same batches)", flush=True)
    baseline = ingest_http.measure(quick)
    batches = baseline["details"]["runs"][0]["batches"]
    print("   -- with 10 meters", flush=True)
    result = ingest_http.measure(
        quick, setup=_create_meters_http, verify=_verify_rollups, batches=batches
    )
    with_meters = _metric_value(result, "events/s (median of runs)")
    without = _metric_value(baseline, "events/s (median of runs)")
    checked = result["details"]["verify"]
    result["metrics"] += [
        metric(
            "events/s ratio to the no-meter run",
            with_meters / without,
            "x",
            ">=",
            TARGET_METERS_RATIO,
        ),
        metric("meters disagreeing with events", checked["disagreeing"], "meters", "==", 0),
    ]
    result["details"]["no_meter_run"] = {
        "events_per_s_median": without,
        "metrics": baseline["metrics"],
        "runs": baseline["details"]["runs"],
    }
    result["details"]["ratio_to_no_meter_run"] = round(with_meters / without, 3)
    return result


def _metric_value(result: dict[str, Any], name: str) -> float:
    return float(next(m["value"] for m in result["metrics"] if m["name"] == name))


def _create_meters_http(server: Server) -> dict[str, Any]:
    created = []
    with server.client() as client:
        for definition in METERS:
            response = client.post("/v1/meters/", json=definition)
            if response.status_code != 201:
                raise RuntimeError(f"meter not created: {response.status_code} {response.text}")
            created.append(response.json())
    return {
        "organization_id": created[0]["organization_id"],
        "meters": [{"id": m["id"], "name": m["name"], "backfill": m["backfill"]} for m in created],
    }


def _verify_rollups(server: Server) -> dict[str, Any]:
    with duckdb.connect(str(server.database), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        org = con.execute("SELECT DISTINCT organization_id::VARCHAR FROM meters").fetchall()
        return check_rollups(con, org[0][0])


# ---- rollup_update --------------------------------------------------------------------------

TARGET_ROLLUP_EVENTS_PER_S = 500_000
ROLLUP_BATCH = 10_000  # events per transaction: a group commit at ~100k events/s
SMALL_BATCH = 1_000  # one request's batch: a group of one, the worst case
ROLLUP_FULL = {"distinct_batches": 10, "events": 500_000, "ingest_batches": 20}
ROLLUP_QUICK = {"distinct_batches": 2, "events": 40_000, "ingest_batches": 4}


def rollup_update(quick: bool = False) -> dict[str, Any]:
    """Rollups of 10 meters and the ledger absorb ≥ 500,000 events/s (in-process, batches of
    10,000).

    Hypothesis: the work ingest adds per transaction for 10 meters (which meters, their
    contributions, the appended deltas) costs under 1/500,000 s per event, so at 100,000
    events/s rollups take at most a fifth of the writer's time.
    """
    return asyncio.run(_rollup_update(ROLLUP_QUICK if quick else ROLLUP_FULL))


async def _rollup_update(plan: dict[str, int]) -> dict[str, Any]:
    started = time.perf_counter()
    tables = realistic_events(plan["distinct_batches"], ROLLUP_BATCH, seed=7, tag="rollup")
    build_seconds = time.perf_counter() - started
    org = "6d4c4b4e-5f5a-4c43-9a6c-1c7e0f3b2a10"
    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp:
        async with Store(Path(tmp) / "apply.duckdb") as store:
            await create_meters(store, org)
            big = await _time_apply(store, org, tables, plan["events"])
            small_tables = [tables[0].slice(i * SMALL_BATCH, SMALL_BATCH) for i in range(10)]
            small = await _time_apply(store, org, small_tables, plan["events"] // 10)
            rows = await store.read(_rollup_rows)
        async with (
            Store(Path(tmp) / "meters.duckdb") as metered,
            Store(Path(tmp) / "plain.duckdb") as plain,
        ):
            await create_meters(metered, org)
            ingest = await _time_ingest(metered, plain, org, tables, plan["ingest_batches"])
            checked = await metered.read(check_rollups, org)
    rate = big["events"] / big["apply_seconds"]
    metrics = [
        metric(
            f"rollup events/s (10 meters, batches of {ROLLUP_BATCH:,})",
            rate,
            "events/s",
            ">=",
            TARGET_ROLLUP_EVENTS_PER_S,
        ),
        metric("rollup time per batch p50", big["p50_ms"], "ms"),
        metric("rollup time per batch p99", big["p99_ms"], "ms"),
        metric("commit of a rollup-only batch p50", big["commit_p50_ms"], "ms"),
        metric(
            f"rollup events/s (batches of {SMALL_BATCH:,})",
            small["events"] / small["apply_seconds"],
            "events/s",
        ),
        metric(
            "ingest events/s with 10 meters (IngestJob)", ingest["with_events_per_s"], "events/s"
        ),
        metric("ingest events/s without meters", ingest["without_events_per_s"], "events/s"),
        metric("meters' marginal ingest cost per event", ingest["marginal_us_per_event"], "µs"),
        metric(
            "meters whose rollups disagree with events", checked["disagreeing"], "meters", "==", 0
        ),
    ]
    return {
        "metrics": metrics,
        "details": {
            "batch_size": ROLLUP_BATCH,
            "meters": [m["name"] for m in METERS],
            "distinct_events": plan["distinct_batches"] * ROLLUP_BATCH,
            "event_build_seconds": round(build_seconds, 2),
            f"apply_batches_of_{ROLLUP_BATCH}": big,
            f"apply_batches_of_{SMALL_BATCH}": small,
            "rollup_rows_after": rows,
            "ingest_with_and_without_meters": ingest,
            "check": checked,
            "rss_mib": _rss_mib(),
        },
    }


def _batch_new(table: pa.Table, organization_id: str, first_seq: int) -> pa.Table:
    """A batch as ingest registers it (`_batch_new`): the events plus the columns it adds."""
    n = table.num_rows
    now = now_us()
    table = table.append_column("organization_id", pa.array([organization_id] * n, pa.string()))
    table = table.append_column("ingested_at", pa.array([now] * n, pa.timestamp("us", tz="UTC")))
    table = table.append_column("source", pa.array(["user"] * n, pa.string()))
    return table.append_column("seq", pa.array(range(first_seq, first_seq + n), pa.int64()))


def apply_meters(tx: Tx, batch: pa.Table, organization_id: str, *, ledger: bool = True) -> None:
    """Everything ingest does for meters, in one writer job: every meter's contribution and the
    ledger's usage (the writer), and what a flush stores as a job stores it
    (`Live.store_contributions`): the rollups' partials as segment files listed in the job's
    transaction, and the ledger's usage as deltas, folded into the balances at commit (once:
    ingest's own fold, `Live.add_usage`, is that one)."""
    con = tx.con
    meters = meters_of(con, [organization_id])
    con.register("_batch_new", batch)
    try:
        evaluated = rollups.evaluate(
            con,
            meters,
            "_batch_new",
            "organization_id = ?",
            [organization_id],
            at_us=now_us(),
            ledger=ledger,
        )
    finally:
        con.unregister("_batch_new")
    tx.live.store_contributions(con, [evaluated])


def _apply_job(
    store: Store, batch: pa.Table, organization_id: str, timing: list[float]
) -> Job[None]:
    """`apply_meters` as a writer job, timed inside it."""

    def job(tx: Tx) -> None:

        started = time.perf_counter()
        apply_meters(tx, batch, organization_id)
        timing.append(time.perf_counter() - started)

    return job


async def _time_apply(
    store: Store, organization_id: str, tables: list[pa.Table], events: int
) -> dict[str, Any]:
    batches = [_batch_new(t, organization_id, 1 + i * t.num_rows) for i, t in enumerate(tables)]
    inside: list[float] = []
    await store.write(_apply_job(store, batches[0], organization_id, []))  # warm-up, untimed
    walls: list[float] = []
    applied = 0
    while applied < events:
        batch = batches[len(walls) % len(batches)]
        started = time.perf_counter()
        await store.write(_apply_job(store, batch, organization_id, inside))
        walls.append(time.perf_counter() - started)
        applied += batch.num_rows
    apply_seconds = sum(inside)
    commits = [wall - job for wall, job in zip(walls, inside, strict=True)]
    _print(f"apply, batches of {batches[0].num_rows:,}", applied, apply_seconds)
    return {
        "events": applied,
        "batches": len(walls),
        "apply_seconds": round(apply_seconds, 3),
        "events_per_s": round(applied / apply_seconds, 1),
        "with_commit_events_per_s": round(applied / sum(walls), 1),
        "p50_ms": _ms(inside, 50),
        "p99_ms": _ms(inside, 99),
        "commit_p50_ms": _ms(commits, 50),
    }


def _rollup_rows(con: Con) -> dict[str, int]:
    count = con.execute("SELECT count(*) FROM all_rollups").fetchall()[0][0]
    values = con.execute("SELECT count(*) FROM all_rollup_values").fetchall()[0][0]
    return {"rollups": int(count), "rollup_values": int(values)}


async def _time_ingest(
    metered: Store, plain: Store, organization_id: str, tables: list[pa.Table], batches: int
) -> dict[str, Any]:
    """The same batches through `IngestJob` into both stores, interleaved so that noise on
    this shared machine hits both alike; external ids are fresh each time (no duplicates)."""
    seconds = {"with": 0.0, "without": 0.0}
    events = 0
    for i in range(-1, batches):  # -1: warm-up, untimed
        table = tables[i % len(tables)]
        ids = pa.array([f"pass{i}-{j}" for j in range(table.num_rows)], pa.string())
        table = table.set_column(table.schema.get_field_index("external_id"), "external_id", ids)
        for key, store in (("with", metered), ("without", plain)):
            job = IngestJob(organization_id, table, now_us())
            started = time.perf_counter()
            result = await store.write(job, weight=table.num_rows)
            if i >= 0:
                seconds[key] += time.perf_counter() - started
            if result.inserted != table.num_rows:
                raise RuntimeError(f"{key}: inserted {result.inserted} of {table.num_rows}")
        events += table.num_rows if i >= 0 else 0
    marginal = seconds["with"] - seconds["without"]
    _print("ingest with meters", events, seconds["with"])
    _print("ingest without meters", events, seconds["without"])
    return {
        "events": events,
        "batch_size": tables[0].num_rows,
        "with_seconds": round(seconds["with"], 3),
        "without_seconds": round(seconds["without"], 3),
        "with_events_per_s": round(events / seconds["with"], 1),
        "without_events_per_s": round(events / seconds["without"], 1),
        "marginal_us_per_event": round(marginal / events * 1e6, 3),
        "implied_rollup_events_per_s": round(events / marginal, 1) if marginal > 0 else None,
    }


def _print(label: str, events: int, seconds: float) -> None:
    print(
        f"   {label}: {events:,} events in {seconds:.2f} s = {events / seconds:,.0f} events/s",
        flush=True,
    )


# ---- quantities_10m -------------------------------------------------------------------------

TARGET_CUSTOMER_P99_MS = 10.0
TARGET_ALL_CUSTOMERS_MS = 500.0
LOAD_BUDGET_SECONDS = 360.0
BACKFILL_CHUNK = 200_000  # the Backfiller's default chunk_events
DAYS = 60
QUANTITIES_FULL = {
    "events": 10_000_000,
    "chunk": 1_000_000,
    "customer_queries": 200,
    "all_queries": 20,
    "http_customer_queries": 50,
    "http_all_queries": 10,
    "unaligned_queries": 3,
}
QUANTITIES_QUICK = {
    "events": 200_000,
    "chunk": 100_000,
    "customer_queries": 50,
    "all_queries": 5,
    "http_customer_queries": 10,
    "http_all_queries": 3,
    "unaligned_queries": 1,
}
METER = _meter("Total tokens", "sum", "_llm.total_tokens")

# Events $lo <= seq < $hi, ingested evenly over the period from $start_us ($step_us apart), each
# timestamped up to an hour before its ingestion; values drawn like loadgen.make_event's, from
# hashes of seq (deterministic). Customers follow a Zipf-like law close to loadgen's weights.
# Rows of the events' base table (as a data dir of an earlier version holds them; the store
# moves them into a file when it next opens): SQL cannot write segments, and the quantities
# read the rollups the backfill makes of them.
LOAD_SQL = """
INSERT INTO events_base (seq, organization_id, name, timestamp, ingested_at, customer_id,
    external_customer_id, external_member_id, external_id, parent_id, metadata, cost_amount)
WITH r AS (
    SELECT i AS seq,
        (hash(i, 1) % 1000000) / 1e6 AS u_customer,
        (hash(i, 2) % 100)::INTEGER AS u_model,
        greatest((hash(i, 3) % 1000000) / 1e6, 1e-9) AS u1,
        (hash(i, 4) % 1000000) / 1e6 AS u2,
        greatest((hash(i, 5) % 1000000) / 1e6, 1e-9) AS u3,
        (hash(i, 6) % 1000000) / 1e6 AS u4,
        (hash(i, 7) % 6)::INTEGER + 1 AS route_i,
        (hash(i, 8) % 4)::INTEGER + 1 AS region_i,
        (hash(i, 9) % 5)::INTEGER + 1 AS cache_i,
        (hash(i, 10) % 100)::INTEGER AS u_stream,
        (hash(i, 11) % 3600000000)::BIGINT AS lag_us
    FROM range($lo, $hi) t(i)
), m AS (
    SELECT *,
        CASE WHEN u_model < 40 THEN 1 WHEN u_model < 55 THEN 2 WHEN u_model < 63 THEN 3
            WHEN u_model < 73 THEN 4 WHEN u_model < 85 THEN 5 WHEN u_model < 95 THEN 6
            ELSE 7 END AS mi,
        (['/v1/chat', '/v1/chat', '/v1/chat', '/v1/completions', '/v1/embeddings',
            '/v1/agents/run'])[route_i] AS route,
        -- lognormal(6.5, 1.0) and lognormal(5.3, 0.9) by Box-Muller
        least(120000, floor(exp(6.5 + sqrt(-2 * ln(u1)) * cos(2 * pi() * u2)))::BIGINT + 1)
            AS input_tokens,
        least(16000, floor(exp(5.3 + 0.9 * sqrt(-2 * ln(u3)) * cos(2 * pi() * u4)))::BIGINT + 1)
            AS output_raw
    FROM r
), e AS (
    SELECT *, route = '/v1/embeddings' AS embedding,
        CASE WHEN route = '/v1/embeddings' THEN 0 ELSE output_raw END AS output_tokens,
        floor(input_tokens * ([0, 0, 0.25, 0.5, 0.9])[cache_i])::BIGINT AS cached,
        (['openai', 'openai', 'openai', 'anthropic', 'anthropic', 'google', 'mistral'])[mi]
            AS vendor,
        (['gpt-4o-mini', 'gpt-4o', 'o3-mini', 'claude-3-5-haiku', 'claude-sonnet-4',
            'gemini-2.0-flash', 'mistral-small'])[mi] AS model,
        ([0.15e-4, 2.50e-4, 1.10e-4, 0.80e-4, 3.00e-4, 0.10e-4, 0.20e-4])[mi] AS in_price,
        ([0.60e-4, 10.0e-4, 4.40e-4, 4.00e-4, 15.0e-4, 0.40e-4, 0.60e-4])[mi] AS out_price,
        floor(pow(1 + u_customer * (pow(10000, 0.2) - 1), 5))::INTEGER - 1 AS customer,
        $start_us + (seq - 1) * $step_us AS ingested_us
    FROM m
), c AS (
    SELECT *, CAST((input_tokens - cached) * in_price + cached * in_price / 2
        + output_tokens * out_price AS DECIMAL(17, 8)) AS cost
    FROM e
)
SELECT seq, $org::UUID, CASE WHEN embedding THEN 'llm_embedding' ELSE 'llm_completion' END,
    make_timestamptz(ingested_us - lag_us), make_timestamptz(ingested_us), NULL,
    'cust_' || lpad(customer::VARCHAR, 5, '0'), NULL, 'load-' || seq::VARCHAR, NULL,
    printf('{"_llm":{"vendor":"%s","model":"%s","prompt":null,"response":null,'
        || '"input_tokens":%d,"output_tokens":%d,"total_tokens":%d,"cached_input_tokens":%d},'
        || '"_cost":{"amount":"%s","currency":"usd"},"route":"%s","region":"%s","streamed":%s}',
        vendor, model, input_tokens, output_tokens, input_tokens + output_tokens, cached,
        rtrim(rtrim(cost::VARCHAR, '0'), '.'), route,
        (['eu-west-1', 'us-east-1', 'us-west-2', 'ap-southeast-1'])[region_i],
        CASE WHEN NOT embedding AND u_stream < 70 THEN 'true' ELSE 'false' END),
    cost
FROM c
"""
# What ingest keeps beside the events: each customer reference's first event time.
SUBJECTS_SQL = (
    "INSERT INTO event_subjects SELECT organization_id, 'ext:' || external_customer_id,"
    " min(timestamp) FROM events GROUP BY ALL"
)


def quantities_10m(quick: bool = False) -> dict[str, Any]:
    """Backfill and quantities at 10M events: one customer's 31 days p99 ≤ 10 ms, all
    customers' monthly totals ≤ 500 ms.

    Hypothesis: with 10 million stored events (10,000 customers, 60 days), a new meter's
    backfill completes, and quantities read from its rollups answer one customer's 31 daily
    buckets in ≤ 10 ms (p99) and every customer's monthly totals in ≤ 500 ms.
    """
    return _quantities(QUANTITIES_QUICK if quick else QUANTITIES_FULL)


def quantities_1m(quick: bool = False) -> dict[str, Any]:
    """quantities_10m at 1 million events (the same 10,000 customers and 60 days): the curve's
    other point, to see what grows with the events stored."""
    return _quantities(QUANTITIES_QUICK if quick else QUANTITIES_FULL | {"events": 1_000_000})


def _quantities(plan: dict[str, int]) -> dict[str, Any]:
    server = Server()  # owns the temp data dir; started only after the in-process part
    try:
        org = served_organization(server.data_dir)
        details = asyncio.run(_quantities_in_process(server.database, org, plan))
    except BaseException:
        shutil.rmtree(server.data_dir, ignore_errors=True)
        raise
    started = time.perf_counter()
    with server:
        details["http"] = _quantities_http(server, details, plan)
        details["http"]["start_seconds"] = round(time.perf_counter() - started, 2)
    load, backfill, http = details["load"], details["backfill"], details["http"]
    customer = details["queries"]["one_customer_31_days"]
    everyone = details["queries"]["all_customers_monthly"]
    per_customer = details["queries"]["all_customers_monthly_summed_per_customer"]
    scan = details["check"]["meters"][0]
    metrics = [
        metric("events loaded", load["events"], "events"),
        metric("load rate (SQL insert)", load["events_per_s"], "events/s"),
        metric("backfill of a new meter", backfill["seconds"], "s"),
        metric("backfill rate", backfill["events_per_s"], "events/s"),
        metric("one customer, 31 days: p50 (in-process)", customer["p50_ms"], "ms"),
        metric(
            "one customer, 31 days: p99 (in-process)",
            customer["p99_ms"],
            "ms",
            "<=",
            TARGET_CUSTOMER_P99_MS,
        ),
        metric("one customer, 31 days: p50 (HTTP)", http["customer"]["p50_ms"], "ms"),
        metric(
            "one customer, 31 days: p99 (HTTP)",
            http["customer"]["p99_ms"],
            "ms",
            "<=",
            TARGET_CUSTOMER_P99_MS,
        ),
        metric(
            "all customers, monthly: median (in-process)",
            everyone["p50_ms"],
            "ms",
            "<=",
            TARGET_ALL_CUSTOMERS_MS,
        ),
        metric("all customers, monthly: slowest (in-process)", everyone["max_ms"], "ms"),
        metric("all customers, monthly: median (HTTP)", http["all"]["p50_ms"], "ms"),
        metric("all customers, summed per customer: median", per_customer["p50_ms"], "ms"),
        metric(
            "one customer, 31 days, unaligned window: median",
            details["queries"]["one_customer_31_days_unaligned"]["p50_ms"],
            "ms",
        ),
        metric(
            "all customers, monthly, unaligned window",
            details["queries"]["all_customers_monthly_unaligned"]["p50_ms"],
            "ms",
        ),
        metric("same total from the events (no rollups)", scan["events_scan_seconds"] * 1e3, "ms"),
        metric("rollups disagree with events", details["check"]["disagreeing"], "meters", "==", 0),
        metric("DuckDB file size", details["file_mib"], "MiB"),
        metric("in-process RSS, store open", details["rss_mib_after_queries"], "MiB"),
        metric("server RSS after HTTP queries", http["server_rss_mib"], "MiB"),
        metric("server start on the loaded file", http["start_seconds"], "s"),
        metric(
            "store reopened (in-memory state rebuilt)", details["reopen_seconds"], "s", "<=", 10
        ),
        metric("stored keys held in memory", details["memory"]["stored_keys_mib"], "MiB"),
    ]
    return {"metrics": metrics, "details": details}


async def _quantities_in_process(database: Path, org: str, plan: dict[str, int]) -> dict[str, Any]:
    details: dict[str, Any] = {"organization_id": org, "planned_events": plan["events"]}
    async with Store(database) as store:
        details["load"] = load = await _load(store, org, plan)
        details["file_mib_after_load"] = _file_mib(database)
        details["rss_mib_after_load"] = _rss_mib()
        meter = await store.write(
            create_job(org, MeterCreate.model_validate(METER), now_us(), meter_id=str(uuid.uuid4()))
        )
        details["meter_id"] = meter.id
        details["backfill"] = await _backfill(store, meter)
        details["settle_seconds"] = await _settled(store)
        details["rss_mib_after_backfill"] = _rss_mib()
        details["rollup_rows"] = (await store.read(_rollup_rows))["rollups"]
        details["check"] = await store.read(check_rollups, org)
        end = load["start_us"] + load["events"] * load["step_us"]
        day_end = end // DAY_US * DAY_US
        windows = {
            "one_customer": (day_end - 31 * DAY_US, day_end - 1_000_000),  # 00:00 to 23:59:59
            "all": (load["start_us"] - 3_600_000_000, end),
        }
        # The same ranges from "now"-style instants (not on 15-minute boundaries): the parts
        # outside whole buckets (both edges) come from the events.
        off = (7 * 60 + 13) * 1_000_000
        windows["one_customer_unaligned"] = (windows["one_customer"][0] + off, end - off)
        windows["all_unaligned"] = (windows["all"][0] + off, end - off)
        details["windows"] = {k: [_iso(lo), _iso(hi)] for k, (lo, hi) in windows.items()}
        customers = [f"ext:cust_{i * 37 % 10000:05d}" for i in range(plan["customer_queries"])]
        details["queries"] = {
            "one_customer_31_days": await _time_compute(
                store, [Scope(meter, (c,)) for c in customers], windows["one_customer"], "day"
            ),
            "all_customers_monthly": await _time_compute(
                store, [Scope(meter, None)] * plan["all_queries"], windows["all"], "month"
            ),
            # Polar's customer_aggregation_function=sum: per-customer quantities, then summed.
            "all_customers_monthly_summed_per_customer": await _time_compute(
                store,
                [Scope(meter, None, by_customer=True)] * max(3, plan["all_queries"] // 4),
                windows["all"],
                "month",
                across="sum",
            ),
            "one_customer_31_days_unaligned": await _time_compute(
                store,
                [Scope(meter, (c,)) for c in customers[: plan["unaligned_queries"]]],
                windows["one_customer_unaligned"],
                "day",
            ),
            "all_customers_monthly_unaligned": await _time_compute(
                store, [Scope(meter, None)], windows["all_unaligned"], "month"
            ),
        }
        details["rss_mib_after_queries"] = _rss_mib()
        details["peak_rss_mib"] = round(memory_kib(os.getpid())["VmHWM"] / 1024, 1)
    details["file_mib"] = _file_mib(database)
    # The in-memory state, rebuilt from the file: how long a restart takes to hold it again.
    started = time.perf_counter()
    async with Store(database) as store:
        details["reopen_seconds"] = round(time.perf_counter() - started, 2)
        details["memory"] = _held(store)
    return details


def _held(store: Store) -> dict[str, Any]:
    """What the store holds in memory, and its bytes (`BYTES_PER_*`: measured costs)."""
    live = store.live
    return {
        "stored_keys": len(live.dedupe),
        "stored_keys_mib": round(live.dedupe.bytes / 2**20, 1),
        "balance_slots": live.balances.slots,
        "balance_mib": round(live.balances.slots * BYTES_PER_SLOT / 2**20, 1),
        "unique_values_mib": round(live.balances.values_bytes / 2**20, 1),
        "customers_held": len(live.catalog),
        "customers_mib": round(len(live.catalog) * BYTES_PER_CUSTOMER / 2**20, 1),
    }


def _sql_job(sql: str, params: dict[str, Any] | None = None) -> Job[None]:
    def job(tx: Tx) -> None:
        con = tx.con
        con.execute(sql, params or {})

    return job


async def _load(
    store: Store, org: str, plan: dict[str, int], sql: str = LOAD_SQL
) -> dict[str, Any]:
    """`plan["events"]` events written by `sql` (`LOAD_SQL`'s parameters), in writer jobs of
    `plan["chunk"]`, then their customer references (`SUBJECTS_SQL`) and a checkpoint."""
    count, chunk = plan["events"], plan["chunk"]
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start_us = (today - timedelta(days=DAYS) - EPOCH) // timedelta(microseconds=1)
    step_us = DAYS * DAY_US // count
    loaded, chunks = 0, []
    started = time.perf_counter()
    for lo in range(1, count + 1, chunk):
        hi = min(count + 1, lo + chunk)
        params = {"lo": lo, "hi": hi, "start_us": start_us, "step_us": step_us, "org": org}
        chunk_started = time.perf_counter()
        await store.write(_sql_job(sql, params))
        chunks.append(round(time.perf_counter() - chunk_started, 2))
        loaded = hi - 1
        elapsed = time.perf_counter() - started
        print(
            f"   loaded {loaded:,} events in {elapsed:.0f} s, RSS {_rss_mib():,.0f} MiB", flush=True
        )
        if elapsed > LOAD_BUDGET_SECONDS:
            break
    seconds = time.perf_counter() - started
    await store.write(_sql_job(SUBJECTS_SQL))
    checkpoint_started = time.perf_counter()
    await store.read(lambda con: con.execute("CHECKPOINT"))
    return {
        "events": loaded,
        "complete": loaded == count,
        "seconds": round(seconds, 2),
        "events_per_s": round(loaded / seconds, 1),
        "chunk_events": chunk,
        "chunk_seconds": chunks,
        "checkpoint_seconds": round(time.perf_counter() - checkpoint_started, 2),
        "start_us": start_us,
        "step_us": step_us,
    }


async def _backfill(store: Store, meter: MeterRow) -> dict[str, Any]:
    """The Backfiller's loop: one writer job (transaction) per chunk of events, until done."""
    steps: list[float] = []
    started = time.perf_counter()
    while True:
        step_started = time.perf_counter()
        progress = await store.write(backfill_step_job(meter.id, meter.version, BACKFILL_CHUNK))
        steps.append(time.perf_counter() - step_started)
        if progress is None:
            raise RuntimeError("backfill went stale")
        done, target = progress
        if done >= target:
            break
    seconds = time.perf_counter() - started
    _print("backfill", target, seconds)
    return {
        "events": target,
        "seconds": round(seconds, 2),
        "events_per_s": round(target / seconds, 1),
        "steps": len(steps),
        "chunk_events": BACKFILL_CHUNK,
        "step_p50_ms": _ms(steps, 50),
        "step_max_ms": _ms(steps, 100),
        "first_step_ms": round(steps[0] * 1000, 1),
        "last_step_ms": round(steps[-1] * 1000, 1),
    }


async def _settled(store: Store, quiet: float = 8.0, limit: float = 300.0) -> float:
    """Wait until the segments' background merges are done (none for `quiet` seconds): the
    queries are timed on the store as it stays, not beside a merge of the backfill's files.
    Returns how long that took."""
    started = time.perf_counter()
    seen, since = store.merger.merges, time.perf_counter()
    while time.perf_counter() - since < quiet and time.perf_counter() - started < limit:
        await asyncio.sleep(0.5)
        if store.merger.merges != seen:
            seen, since = store.merger.merges, time.perf_counter()
    return round(time.perf_counter() - started, 1)


async def _time_compute(
    store: Store,
    scopes: list[Scope],
    window: tuple[int, int],
    interval: Interval,
    across: str | None = None,
) -> dict[str, Any]:
    """`compute` as `/quantities` runs it (on a reader thread), one query at a time."""
    latencies: list[float] = []
    totals: list[float] = []
    periods = 0
    for scope in scopes:
        started = time.perf_counter()
        quantities, total = await store.read(
            compute, scope, *window, interval, UTC_ZONE, across, now_us()
        )
        latencies.append(time.perf_counter() - started)
        totals.append(total)
        periods = len(quantities)
    result = {
        "queries": len(scopes),
        "periods": periods,
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "max_ms": _ms(latencies, 100),
        "first_total": totals[0],
    }
    print(f"   quantities, {interval}, {len(scopes)} queries: {result}", flush=True)
    return result


def _quantities_http(
    server: Server, details: dict[str, Any], plan: dict[str, int]
) -> dict[str, Any]:
    """A smaller sample of the same queries over HTTP (`GET /v1/meters/{id}/quantities`)."""
    path = f"/v1/meters/{details['meter_id']}/quantities"

    def sample(window: list[str], interval: str, customers: list[str | None]) -> dict[str, Any]:
        latencies: list[float] = []
        totals: list[float] = []
        with server.client() as client:
            for customer in customers:
                params = {
                    "start_timestamp": window[0],
                    "end_timestamp": window[1],
                    "interval": interval,
                    "timezone": "UTC",
                }
                if customer is not None:
                    params["external_customer_id"] = customer
                started = time.perf_counter()
                response = client.get(path, params=params)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                totals.append(response.json()["total"])
        return {
            "queries": len(customers),
            "p50_ms": _ms(latencies, 50),
            "p99_ms": _ms(latencies, 99),
            "first_total": totals[0],
        }

    windows = details["windows"]
    customers = [f"cust_{i * 37 % 10000:05d}" for i in range(plan["http_customer_queries"])]
    one = sample(windows["one_customer"], "day", list(customers))
    everyone = sample(windows["all"], "month", [None] * plan["http_all_queries"])
    queries = details["queries"]
    return {
        "customer": one,
        "all": everyone,
        "total_matches": one["first_total"] == queries["one_customer_31_days"]["first_total"]
        and everyone["first_total"] == queries["all_customers_monthly"]["first_total"],
        "server_rss_mib": round(server.memory_kib()["VmRSS"] / 1024, 1),
        "server_peak_rss_mib": round(server.memory_kib()["VmHWM"] / 1024, 1),
    }


def _file_mib(database: Path) -> float:
    wal = database.with_name(database.name + ".wal")
    size = database.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    return round(size / 2**20, 1)


def _iso(us: int) -> str:
    return (EPOCH + timedelta(microseconds=us)).isoformat()
