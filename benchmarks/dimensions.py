"""Dimensions (issue 64): quantities split by a meter's dimensions at 10M events, and what
dimensions cost ingest.

Hypotheses (issue 64's bars):
- With 10 million stored events whose metadata has 3 dimensions of 20 values each, one
  customer's quantities over 31 days by day, grouped by one dimension, answer over HTTP in
  p99 ≤ 15 ms.
- Ingest with 10 meters, 5 of them with dimensions, keeps ≥ 0.8× the events per core-second
  of the same 10 meters without dimensions.

Two benchmarks, each runnable alone by name:

    .venv/bin/python -m benchmarks.run dimensions_10m       # both bars; --quick for a smoke run
    .venv/bin/python -m benchmarks.run dimensions_ingest    # the ingest bar alone

The events: the three dimensions are `_llm.model` (20 model names), `region` (20 cloud
regions) and `team` (20 team names), each value drawn with a Zipf-like law over 20 (index k with
probability ln((k + 2) / (k + 1)) / ln 21: the first value about 23%, the last 1.6%). Models
are global (every customer's most used is the first); a customer's regions and teams are the
same law shifted by the customer (`(customer * 7 + k) % 20`, `(customer * 13 + k) % 20`), so
each customer has a home region and a main team of its own and all 20 values are used overall.
One event in 20 has no `team` (its group is `null`). Everything else is loadgen's (tokens,
cost, routes, streamed), and customers follow quantities_10m's Zipf-like law (exponent 0.8)
over 10,000.

dimensions_10m, latency: quantities_10m's way (`meters._load`): 10,000,000 events (`LOAD_SQL`,
the same distributions in SQL) written straight into `events_base` in writer jobs (moved into
a file when the store next opens), 60 days;
then one sum meter of `_llm.total_tokens` with the three dimensions is created and backfilled
step by step (`backfill_step_job`), and the store's background merges are left to settle. In
process (`meter_service.partials` and `quantities`, as the route calls them), a small sample
grouped by one dimension; then the store is closed and `meterline up` serves the data dir, and
over HTTP (`GET /v1/meters/{id}/quantities`, 31 days to 23:59:59 UTC, interval day, by
`external_customer_id`): grouped by one dimension (the bar; each sampled customer once per
dimension, the 3 customers checked by SQL first, then the others in an order shuffled so that
heavy and light ones alternate), the same without
`group_by`, restricted by `dimension[x]=v` (v: the customer's largest group), and grouped by
two dimensions. The customers sampled: the 10 heaviest (the heaviest sends about 2.8% of all
events) and the rest spread log-uniformly over the ranks 10 to 9,999. Each variant stops
sampling after a time budget (reads from the events, before rollups keyed by dimension values,
take seconds at this size): `queries` says how many ran. Checks: every grouped answer's groups
add up to its ungrouped quantities and total; its total equals the ungrouped query's; a
restricted total equals its group's; and for 3 customers (the heaviest, a middle one, a light
one), every group's total of each dimension equals a SQL aggregate over their events.

dimensions_ingest (also run by dimensions_10m): the 10 meters of `benchmarks.meters` (`METERS`)
in a fresh in-process `Store`, with 5 of them (count, sum, avg, min and max:
`DIMENSIONED_METERS`) given the three dimensions, against the same 10 without dimensions.
Events of the same law over 10,000 customers, validated once (untimed), sent as the embedded
publisher applies a request (requests of 1,000 events, 8 in flight: `Store.prepare`, then an
`IngestJob` with the request's encoded body, as the edge's validation hands it over); the clock
and the process's CPU (`time.process_time`: the writer, DuckDB's threads, the flusher and the
merger) stop once the flusher has stored everything (`Store.stored`) and no segment merge is
due. Not in it: HTTP and validation, which dimensions do not change: the ratio here is the
stricter one (over the whole server the same added CPU is a smaller share). An untimed pair of
stores first; then each run is a fresh store per configuration, alternating which goes first;
5 runs of 1,000,000 events; the bar is the ratio of the medians. After the
last run, the dimensioned store's rollups are checked against its events (`check_rollups`), and
its grouped quantities of each dimensioned meter, for the heaviest customer and another, against
SQL aggregates over their events.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import httpx
import orjson
import pyarrow as pa

from aggregator.services import meter_service
from aggregator.store import IngestJob, Store, with_origin
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.tables.meter_tables import create_job
from benchmarks.common import metric, percentile
from benchmarks.loadgen import make_event
from benchmarks.meters import (
    DAY_US,
    METERS,
    _backfill,
    _file_mib,
    _iso,
    _load,
    _meter,
    _rss_mib,
    _settled,
    check_rollups,
)
from benchmarks.server import Server, served_organization
from meters.definitions import MeterCreate
from meters.events import EventRules, parse_ingest_body, to_table
from meters.ipc import Encoded
from meters.times import now_us

Con = duckdb.DuckDBPyConnection
UTC_ZONE = ZoneInfo("UTC")

TARGET_GROUPED_P99_MS = 15.0  # issue 64's bar, over HTTP
TARGET_INGEST_RATIO = 0.8  # issue 64's bar: with dimensions / without, events per core-second

# (vendor, model, cents per input token, cents per output token), most used first.
MODELS = (
    ("openai", "gpt-4o-mini", 0.15e-4, 0.60e-4),
    ("openai", "gpt-4o", 2.50e-4, 10.0e-4),
    ("anthropic", "claude-sonnet-4", 3.00e-4, 15.0e-4),
    ("google", "gemini-2.0-flash", 0.10e-4, 0.40e-4),
    ("openai", "gpt-4.1-mini", 0.40e-4, 1.60e-4),
    ("anthropic", "claude-3-5-haiku", 0.80e-4, 4.00e-4),
    ("openai", "o3-mini", 1.10e-4, 4.40e-4),
    ("google", "gemini-2.5-flash", 0.30e-4, 2.50e-4),
    ("openai", "gpt-4.1", 2.00e-4, 8.00e-4),
    ("mistral", "mistral-small", 0.20e-4, 0.60e-4),
    ("meta", "llama-3.3-70b", 0.60e-4, 0.60e-4),
    ("deepseek", "deepseek-v3", 0.27e-4, 1.10e-4),
    ("openai", "o4-mini", 1.10e-4, 4.40e-4),
    ("anthropic", "claude-3-7-sonnet", 3.00e-4, 15.0e-4),
    ("google", "gemini-2.5-pro", 1.25e-4, 10.0e-4),
    ("openai", "gpt-4.1-nano", 0.10e-4, 0.40e-4),
    ("openai", "o3", 2.00e-4, 8.00e-4),
    ("mistral", "mistral-large", 2.00e-4, 6.00e-4),
    ("cohere", "command-r-plus", 2.50e-4, 10.0e-4),
    ("anthropic", "claude-opus-4", 15.0e-4, 75.0e-4),
)
REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-west-2", "eu-west-3",
    "eu-central-1", "eu-central-2", "eu-north-1", "eu-south-1", "ap-southeast-1",
    "ap-southeast-2", "ap-northeast-1", "ap-northeast-2", "ap-south-1", "ca-central-1",
    "sa-east-1", "me-central-1", "af-south-1",
)  # fmt: skip
TEAMS = (
    "search", "support", "agents", "growth", "platform", "billing", "data", "mobile", "web",
    "security", "infra", "research", "sales", "marketing", "legal", "finance", "ops", "design",
    "qa", "onboarding",
)  # fmt: skip
DIMENSIONS = ("_llm.model", "region", "team")
PAIRS = (("_llm.model", "region"), ("region", "team"), ("_llm.model", "team"))
UNTAGGED_ONE_IN = 20  # one event in 20 has no team
# A customer's regions and teams: the Zipf-like law shifted by customer * stride (mod 20).
REGION_STRIDE, TEAM_STRIDE = 7, 13
CUSTOMERS = 10_000
HEAVY = 10  # the heaviest customers, always sampled
VALUES = 20


def _zipf(rng: random.Random) -> int:
    """An index of 0..19, Zipf-like (`LOAD_SQL` draws the same: floor(21^u) - 1)."""
    return int((VALUES + 1) ** rng.random()) - 1


def _sql_list(values: Sequence[str | float]) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"


# quantities_10m's LOAD_SQL (same parameters, customers, tokens, routes, timing) with the three
# dimensions of 20 values; `_llm.model`'s index `mi` is 1-based.
LOAD_SQL = (
    """
INSERT INTO events_base (seq, organization_id, name, timestamp, ingested_at, customer_id,
    external_customer_id, external_member_id, external_id, parent_id, metadata, cost_amount)
WITH r AS (
    SELECT i AS seq,
        (hash(i, 1) % 1000000) / 1e6 AS u_customer,
        (hash(i, 2) % 1000000) / 1e6 AS u_model,
        greatest((hash(i, 3) % 1000000) / 1e6, 1e-9) AS u1,
        (hash(i, 4) % 1000000) / 1e6 AS u2,
        greatest((hash(i, 5) % 1000000) / 1e6, 1e-9) AS u3,
        (hash(i, 6) % 1000000) / 1e6 AS u4,
        (hash(i, 7) % 6)::INTEGER + 1 AS route_i,
        (hash(i, 8) % 1000000) / 1e6 AS u_region,
        (hash(i, 9) % 5)::INTEGER + 1 AS cache_i,
        (hash(i, 10) % 100)::INTEGER AS u_stream,
        (hash(i, 11) % 3600000000)::BIGINT AS lag_us,
        (hash(i, 12) % 1000000) / 1e6 AS u_team,
        (hash(i, 13) % @UNTAGGED@) = 0 AS untagged
    FROM range($lo, $hi) t(i)
), m AS (
    SELECT *,
        floor(pow(1 + u_customer * (pow(10000, 0.2) - 1), 5))::INTEGER - 1 AS customer,
        floor(pow(21, u_model))::INTEGER AS mi,
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
        (@VENDORS@)[mi] AS vendor,
        (@MODELS@)[mi] AS model,
        (@IN_PRICES@)[mi] AS in_price,
        (@OUT_PRICES@)[mi] AS out_price,
        (@REGIONS@)[(customer * @REGION_STRIDE@ + floor(pow(21, u_region))::INTEGER - 1) % 20
            + 1] AS region,
        (@TEAMS@)[(customer * @TEAM_STRIDE@ + floor(pow(21, u_team))::INTEGER - 1) % 20 + 1]
            AS team,
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
        || '"_cost":{"amount":"%s","currency":"usd"},"route":"%s","region":"%s","streamed":%s'
        || '%s}',
        vendor, model, input_tokens, output_tokens, input_tokens + output_tokens, cached,
        rtrim(rtrim(cost::VARCHAR, '0'), '.'), route, region,
        CASE WHEN NOT embedding AND u_stream < 70 THEN 'true' ELSE 'false' END,
        CASE WHEN untagged THEN '' ELSE ',"team":"' || team || '"' END),
    cost
FROM c
""".replace("@UNTAGGED@", str(UNTAGGED_ONE_IN))
    .replace("@VENDORS@", _sql_list([m[0] for m in MODELS]))
    .replace("@MODELS@", _sql_list([m[1] for m in MODELS]))
    .replace("@IN_PRICES@", _sql_list([m[2] for m in MODELS]))
    .replace("@OUT_PRICES@", _sql_list([m[3] for m in MODELS]))
    .replace("@REGIONS@", _sql_list(REGIONS))
    .replace("@TEAMS@", _sql_list(TEAMS))
    .replace("@REGION_STRIDE@", str(REGION_STRIDE))
    .replace("@TEAM_STRIDE@", str(TEAM_STRIDE))
)


def dimensioned_event(
    rng: random.Random, external_id: str, customer: int, now: Any
) -> dict[str, Any]:
    """A loadgen event (`make_event`) of customer `cust_NNNNN` with the three dimensions drawn
    as `LOAD_SQL` draws them (its cost priced for the model drawn)."""
    event: dict[str, Any] = make_event(rng, external_id, f"cust_{customer:05d}", now)
    metadata = event["metadata"]
    llm = metadata["_llm"]
    vendor, model, in_price, out_price = MODELS[_zipf(rng)]
    llm["vendor"], llm["model"] = vendor, model
    cached = llm["cached_input_tokens"]
    cost = (
        (llm["input_tokens"] - cached) * in_price
        + cached * in_price / 2
        + llm["output_tokens"] * out_price
    )
    metadata["_cost"]["amount"] = f"{cost:.8f}"
    metadata["region"] = REGIONS[(customer * REGION_STRIDE + _zipf(rng)) % VALUES]
    team = TEAMS[(customer * TEAM_STRIDE + _zipf(rng)) % VALUES]
    if rng.randrange(UNTAGGED_ONE_IN):
        metadata["team"] = team
    return event


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def _ms(values: Sequence[float], q: float) -> float | None:
    return round(percentile(values, q) * 1000, 2) if values else None


def _name(rank: int) -> str:
    return f"cust_{rank:05d}"


def _sample_customers(count: int) -> list[int]:
    """The `HEAVY` heaviest customers' ranks (at most half the sample) and the rest spread
    log-uniformly over the ranks from there to the lightest, so that every decade of the skew
    is asked (fewer if rounding repeats a rank)."""
    top = list(range(min(HEAVY, count // 2)))
    rest = count - len(top)
    lo, hi = len(top), CUSTOMERS - 1
    spread = {round(lo * (hi / lo) ** (i / max(1, rest - 1))) for i in range(rest)}
    return top + sorted(spread - set(top))


# ---- dimensions_10m: grouped quantities -----------------------------------------------------

LATENCY_FULL = {
    "events": 10_000_000,
    "chunk": 1_000_000,
    "customers": 100,  # over HTTP, each once per dimension: 300 grouped queries
    "extra_customers": 60,  # of them, for each variant without a bar
    "in_process_customers": 20,
    "budget_seconds": 240.0,  # for the grouped queries over HTTP
    "extra_budget_seconds": 60.0,  # for each other variant
}
LATENCY_QUICK = {
    "events": 200_000,
    "chunk": 100_000,
    "customers": 12,
    "extra_customers": 6,
    "in_process_customers": 4,
    "budget_seconds": 60.0,
    "extra_budget_seconds": 30.0,
}
METER = _meter("Total tokens by dimension", "sum", "_llm.total_tokens") | {
    "dimensions": list(DIMENSIONS)
}
READ_TIMEOUT_SECONDS = 600.0  # in process: a grouped read from the events is slow at 10M
HTTP_TIMEOUT_SECONDS = 120.0
SHUFFLE_SEED = 64


def dimensions_10m(quick: bool = False) -> dict[str, Any]:
    """Grouped quantities at 10M events (one customer, 31 days, by one dimension: p99 ≤ 15 ms
    over HTTP), and ingest with 5 of 10 meters dimensioned ≥ 0.8× the events per core-second
    without dimensions.

    Hypothesis (issue 64's bars): with 10 million events whose metadata has 3 dimensions of 20
    values, quantities grouped by one dimension for one customer over 31 days answer over HTTP
    in p99 ≤ 15 ms, exactly; and dimensions on 5 of 10 meters cost ingest at most a fifth of
    its events per core-second.
    """
    latency = _latency(LATENCY_QUICK if quick else LATENCY_FULL)
    ingest = _ingest(INGEST_QUICK if quick else INGEST_FULL)
    return {
        "metrics": latency["metrics"] + ingest["metrics"],
        "details": {"latency": latency["details"], "ingest": ingest["details"]},
    }


def _latency(plan: dict[str, Any]) -> dict[str, Any]:
    server = Server()  # owns the temp data dir; started only after the in-process part
    try:
        org = served_organization(server.data_dir)
        details, expected = asyncio.run(_latency_in_process(server.database, org, plan))
    except BaseException:
        shutil.rmtree(server.data_dir, ignore_errors=True)
        raise
    started = time.perf_counter()
    with server:
        start_seconds = time.perf_counter() - started
        details["http"] = _latency_http(server, details, expected, plan)
        details["http"]["start_seconds"] = round(start_seconds, 2)
    load, backfill, http = details["load"], details["backfill"], details["http"]
    grouped, checks = http["grouped"], http["checks"]
    metrics = [
        metric("events loaded", load["events"], "events"),
        metric("backfill of the meter with 3 dimensions", backfill["seconds"], "s"),
        metric("backfill rate", backfill["events_per_s"], "events/s"),
        metric("grouped by one dimension: p50 (HTTP)", grouped["p50_ms"], "ms"),
        metric(
            "grouped by one dimension: p99 (HTTP)",
            grouped["p99_ms"],
            "ms",
            "<=",
            TARGET_GROUPED_P99_MS,
        ),
        metric("grouped by one dimension: queries (HTTP)", grouped["queries"], "queries"),
        metric(
            f"grouped, the {HEAVY} heaviest customers: p99 (HTTP)", grouped["heavy_p99_ms"], "ms"
        ),
        *(
            metric(f"grouped by {name}: p99 (HTTP)", grouped["by_dimension"][name]["p99_ms"], "ms")
            for name in DIMENSIONS
        ),
        metric("ungrouped: p50 (HTTP)", http["ungrouped"]["p50_ms"], "ms"),
        metric("ungrouped: p99 (HTTP)", http["ungrouped"]["p99_ms"], "ms"),
        metric("dimension[x]=v: p50 (HTTP)", http["restricted"]["p50_ms"], "ms"),
        metric("dimension[x]=v: p99 (HTTP)", http["restricted"]["p99_ms"], "ms"),
        metric("grouped by two dimensions: p50 (HTTP)", http["two_dimensions"]["p50_ms"], "ms"),
        metric("grouped by two dimensions: p99 (HTTP)", http["two_dimensions"]["p99_ms"], "ms"),
        metric("grouped by one dimension: p50 (in-process)", details["in_process"]["p50_ms"], "ms"),
        metric("grouped by one dimension: p99 (in-process)", details["in_process"]["p99_ms"], "ms"),
        metric("HTTP errors", http["errors"], "requests", "==", 0),
        metric(
            "answers inconsistent (groups vs total, grouped vs ungrouped, restricted)",
            checks["inconsistent"],
            "answers",
            "==",
            0,
        ),
        metric(
            "groups disagreeing with SQL over the events",
            checks["disagreeing_with_sql"] + details["in_process"]["disagreeing_with_sql"],
            "answers",
            "==",
            0,
        ),
        metric("DuckDB file size", details["file_mib"], "MiB"),
        metric("server RSS after HTTP queries", http["server_rss_mib"], "MiB"),
    ]
    return {"metrics": metrics, "details": details}


Expected = dict[tuple[str, str], dict[str | None, float]]


async def _latency_in_process(
    database: Path, org: str, plan: dict[str, Any]
) -> tuple[dict[str, Any], Expected]:
    details: dict[str, Any] = {"organization_id": org, "planned_events": plan["events"]}
    async with Store(database, read_timeout_seconds=READ_TIMEOUT_SECONDS) as store:
        details["load"] = load = await _load(store, org, plan, LOAD_SQL)
        meter = await store.write(
            create_job(org, MeterCreate.model_validate(METER), now_us(), meter_id=str(uuid.uuid4()))
        )
        details["meter_id"] = meter.id
        details["backfill"] = await _backfill(store, meter)
        details["settle_seconds"] = await _settled(store)
        details["rss_mib_after_backfill"] = _rss_mib()
        end = load["start_us"] + load["events"] * load["step_us"]
        day_end = end // DAY_US * DAY_US
        window = (day_end - 31 * DAY_US, day_end - 1_000_000)  # 00:00 to 23:59:59, 31 days
        details["window"] = [_iso(window[0]), _iso(window[1])]
        ranks = _sample_customers(plan["customers"])
        details["sampled_ranks"] = ranks
        checked = [ranks[0], ranks[len(ranks) // 2], ranks[-1]]
        details["checked_ranks"] = checked
        expected: Expected = {}
        started = time.perf_counter()
        for rank in checked:
            for name in DIMENSIONS:
                expected[(_name(rank), name)] = await store.read(
                    _expected_groups, org, _name(rank), name, window
                )
        details["sql_check_seconds"] = round(time.perf_counter() - started, 2)
        details["events_in_window"] = {
            _name(r): await store.read(_events_of, org, _name(r), window) for r in checked
        }
        span = meter_service.QuantityWindow(*window, "day", UTC_ZONE)
        in_process = plan["in_process_customers"]
        queries = [
            (_name(rank), DIMENSIONS[(r + i) % len(DIMENSIONS)])
            for r in range(len(DIMENSIONS))
            for i, rank in enumerate(list(dict.fromkeys([*checked, *ranks]))[:in_process])
        ]
        details["in_process"] = await _time_in_process(
            store, org, meter, span, queries, expected, plan["extra_budget_seconds"]
        )
    details["file_mib"] = _file_mib(database)
    return details, expected


def _expected_groups(
    con: Con, org: str, customer: str, name: str, window: tuple[int, int]
) -> dict[str | None, float]:
    """The oracle: the meter's sum of `_llm.total_tokens` per value of dimension `name` over
    the customer's events in [start, end], by plain SQL over the stored events."""
    path = "$." + name
    rows = con.execute(
        "SELECT json_extract_string(metadata, ?) AS v,"
        " sum(CAST(json_extract(metadata, '$._llm.total_tokens') AS DOUBLE))"
        " FROM events WHERE organization_id = ?::UUID AND external_customer_id = ?"
        " AND timestamp >= make_timestamptz(?) AND timestamp <= make_timestamptz(?)"
        " GROUP BY v",
        [path, org, customer, *window],
    ).fetchall()
    return {row[0]: float(row[1]) for row in rows}


def _events_of(con: Con, org: str, customer: str, window: tuple[int, int]) -> int:
    row = con.execute(
        "SELECT count(*) FROM events WHERE organization_id = ?::UUID"
        " AND external_customer_id = ? AND timestamp >= make_timestamptz(?)"
        " AND timestamp <= make_timestamptz(?)",
        [org, customer, *window],
    ).fetchone()
    return int(row[0]) if row else 0


async def _time_in_process(
    store: Store,
    org: str,
    meter: MeterRow,
    window: meter_service.QuantityWindow,
    queries: list[tuple[str, str]],
    expected: Expected,
    budget: float,
) -> dict[str, Any]:
    """Grouped quantities as the route has them made (`partials`, then `quantities`), one at a
    time, until `budget` seconds have passed."""
    latencies: list[float] = []
    disagreeing = 0
    started = time.perf_counter()
    for customer, name in queries:
        if time.perf_counter() - started > budget:
            break
        query_started = time.perf_counter()
        answer = await _grouped(store, org, meter.id, window, customer, name)
        latencies.append(time.perf_counter() - query_started)
        want = expected.get((customer, name))
        if want is not None:
            assert answer.groups is not None
            got = {values[name]: total for values, _, total in answer.groups}
            disagreeing += not _same_groups(got, want)
    result = {
        "queries": len(latencies),
        "planned": len(queries),
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "max_ms": _ms(latencies, 100),
        "disagreeing_with_sql": disagreeing,
    }
    print(f"   in process, grouped by one dimension: {result}", flush=True)
    return result


async def _grouped(
    store: Store,
    org: str,
    meter_id: str,
    window: meter_service.QuantityWindow,
    customer: str,
    name: str,
) -> meter_service.Quantities:
    """One customer's quantities grouped by the dimension `name`, as the route reads them."""
    found, gathered = await meter_service.partials(
        store,
        org,
        meter_id,
        window,
        customer_ids=(),
        external_customer_ids=(customer,),
        metadata=(),
        by_customer=False,
        group_by=(name,),
    )
    return meter_service.quantities(found, gathered, None, (name,))


def _same_groups(got: dict[str | None, float], want: dict[str | None, float]) -> bool:
    return got.keys() == want.keys() and all(_close(got[k], want[k]) for k in want)


Query = tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]  # customer, group_by, dimension


def _latency_http(
    server: Server, details: dict[str, Any], expected: Expected, plan: dict[str, Any]
) -> dict[str, Any]:
    """The queries over HTTP, one at a time on one connection, each variant until its
    budget is spent, and the checks of their answers."""
    path = f"/v1/meters/{details['meter_id']}/quantities"
    window = details["window"]
    ranks = details["sampled_ranks"]
    checked = [_name(r) for r in details["checked_ranks"]]
    order = [_name(r) for r in ranks if _name(r) not in checked]
    random.Random(SHUFFLE_SEED).shuffle(order)
    customers = [*checked, *order]  # the SQL-checked first: the budget never cuts them
    heavy = {_name(r) for r in range(HEAVY)}
    spare = next(_name(r) for r in range(CUSTOMERS - 1, 0, -1) if r not in set(ranks))

    def params(query: Query) -> list[tuple[str, str]]:
        customer, group_by, restrict = query
        found = [
            ("start_timestamp", window[0]),
            ("end_timestamp", window[1]),
            ("interval", "day"),
            ("timezone", "UTC"),
            ("external_customer_id", customer),
        ]
        found += [("group_by", name) for name in group_by]
        return found + [(f"dimension[{name}]", value) for name, value in restrict]

    with server.client() as client:
        client.timeout = httpx.Timeout(HTTP_TIMEOUT_SECONDS)
        # The server's first answers pay for what it loads once: not in the sample.
        warm = _run(client, path, params, [(spare, (name,), ()) for name in DIMENSIONS], 600)
        # Each SQL-checked customer by every dimension first, then the others in rounds.
        grouped_queries: list[Query] = [(c, (name,), ()) for c in checked for name in DIMENSIONS]
        grouped_queries += [
            (customer, (DIMENSIONS[(r + i) % len(DIMENSIONS)],), ())
            for r in range(len(DIMENSIONS))
            for i, customer in enumerate(order)
        ]
        grouped = _run(client, path, params, grouped_queries, plan["budget_seconds"])
        extra = customers[: plan["extra_customers"]]
        ungrouped = _run(
            client, path, params, [(c, (), ()) for c in extra], plan["extra_budget_seconds"]
        )
        restricted_queries: list[Query] = []
        restricted_want: list[float] = []
        for (customer, group_by, _), answer in grouped["answers"]:
            if answer is None or len(restricted_queries) >= plan["extra_customers"]:
                continue
            largest = max(
                (g for g in answer["groups"] if g["dimensions"][group_by[0]] is not None),
                key=lambda g: g["total"],
                default=None,
            )
            if largest is None:
                continue
            value = largest["dimensions"][group_by[0]]
            restricted_queries.append((customer, (), ((group_by[0], value),)))
            restricted_want.append(largest["total"])
        restricted = _run(client, path, params, restricted_queries, plan["extra_budget_seconds"])
        two = _run(
            client,
            path,
            params,
            [(c, PAIRS[i % len(PAIRS)], ()) for i, c in enumerate(extra)],
            plan["extra_budget_seconds"],
        )
    checks = _checks(grouped, ungrouped, restricted, restricted_want, two, expected)
    variants = {"grouped": grouped, "ungrouped": ungrouped, "restricted": restricted}
    variants["two_dimensions"] = two
    summaries = {name: _summary(found, heavy) for name, found in variants.items()}
    summaries["grouped"]["by_dimension"] = {
        name: _summary(_only(grouped, lambda q, n=name: q[1] == (n,)), heavy) for name in DIMENSIONS
    }
    for name, summary in summaries.items():
        print(f"   HTTP, {name}: {summary}", flush=True)
    return {
        **summaries,
        "warm_up_ms": [round(s * 1000, 2) for s in warm["latencies"]],
        "errors": sum(len(v["errors"]) for v in variants.values()) + len(warm["errors"]),
        "checks": checks,
        "server_rss_mib": round(server.memory_kib()["VmRSS"] / 1024, 1),
        "server_peak_rss_mib": round(server.memory_kib()["VmHWM"] / 1024, 1),
    }


def _run(
    client: httpx.Client,
    path: str,
    params: Any,
    queries: list[Query],
    budget: float,
) -> dict[str, Any]:
    """Each query once, in order, until `budget` seconds have passed: the latencies, and the
    answers (None for an error) by query."""
    latencies: list[float] = []
    answers: list[tuple[Query, dict[str, Any] | None]] = []
    errors: list[str] = []
    started = time.perf_counter()
    for query in queries:
        if time.perf_counter() - started > budget:
            break
        query_started = time.perf_counter()
        try:
            response = client.get(path, params=params(query))
        except httpx.HTTPError as exc:
            latencies.append(time.perf_counter() - query_started)
            errors.append(f"{query}: {type(exc).__name__}: {exc}")
            answers.append((query, None))
            continue
        latencies.append(time.perf_counter() - query_started)
        if response.status_code != 200:
            errors.append(f"{query}: HTTP {response.status_code}: {response.text[:300]}")
            answers.append((query, None))
            continue
        answers.append((query, orjson.loads(response.content)))
    return {
        "latencies": latencies,
        "answers": answers,
        "errors": errors,
        "planned": len(queries),
        "seconds": time.perf_counter() - started,
    }


def _only(found: dict[str, Any], keep: Any) -> dict[str, Any]:
    pairs = [(q, s) for (q, _), s in zip(found["answers"], found["latencies"], strict=True)]
    kept = [(q, s) for q, s in pairs if keep(q)]
    return {
        "latencies": [s for _, s in kept],
        "answers": [(q, None) for q, _ in kept],
        "errors": [],
        "planned": len(kept),
        "seconds": sum(s for _, s in kept),
    }


def _summary(found: dict[str, Any], heavy: set[str]) -> dict[str, Any]:
    latencies = found["latencies"]
    heavy_latencies = [
        s for (q, _), s in zip(found["answers"], latencies, strict=True) if q[0] in heavy
    ]
    return {
        "queries": len(latencies),
        "planned": found["planned"],
        "stopped_by_budget": len(latencies) < found["planned"],
        "seconds": round(found["seconds"], 2),
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "max_ms": _ms(latencies, 100),
        "heavy_queries": len(heavy_latencies),
        "heavy_p99_ms": _ms(heavy_latencies, 99),
        "errors": len(found["errors"]),
        "error_samples": found["errors"][:5],
    }


def _checks(
    grouped: dict[str, Any],
    ungrouped: dict[str, Any],
    restricted: dict[str, Any],
    restricted_want: list[float],
    two: dict[str, Any],
    expected: Expected,
) -> dict[str, Any]:
    """What the answers must agree on: a grouped answer's groups make its quantities and
    total (none folded); its total is the ungrouped query's; a restricted total is its
    group's; and the SQL-checked customers' groups are the events' aggregates."""
    problems: list[str] = []
    totals = {q[0]: a["total"] for q, a in ungrouped["answers"] if a is not None}
    for query, answer in [*grouped["answers"], *two["answers"]]:
        if answer is None:
            continue
        problem = _inconsistent(answer)
        if problem is None and query[0] in totals and not _close(answer["total"], totals[query[0]]):
            problem = f"total {answer['total']} != ungrouped {totals[query[0]]}"
        if problem is not None:
            problems.append(f"{query}: {problem}")
    for (query, answer), group_total in zip(restricted["answers"], restricted_want, strict=False):
        if answer is not None and not _close(answer["total"], group_total):
            problems.append(f"{query}: total {answer['total']} != its group's {group_total}")
    disagreeing: list[str] = []
    seen = set()
    for (customer, group_by, _), answer in grouped["answers"]:
        want = expected.get((customer, group_by[0]))
        if want is None:
            continue
        seen.add((customer, group_by[0]))
        got = (
            None
            if answer is None
            else {g["dimensions"][group_by[0]]: g["total"] for g in answer["groups"]}
        )
        if got is None or not _same_groups(got, want):
            disagreeing.append(f"{customer} by {group_by[0]}: {got} != {want}")
    disagreeing += [f"{c} by {n}: not answered" for c, n in expected if (c, n) not in seen]
    return {
        "inconsistent": len(problems),
        "inconsistent_samples": problems[:5],
        "disagreeing_with_sql": len(disagreeing),
        "disagreeing_samples": disagreeing[:5],
        "checked_with_sql": sorted(f"{c} by {n}" for c, n in seen),
    }


def _inconsistent(answer: dict[str, Any]) -> str | None:
    """Why a grouped answer's groups do not make its quantities and total, if they do not."""
    groups = answer["groups"]
    if answer.get("other_groups"):
        return f"{answer['other_groups']} groups folded"
    if not _close(math.fsum(g["total"] for g in groups), answer["total"]):
        return f"groups' totals sum to {math.fsum(g['total'] for g in groups)}"
    for i, period in enumerate(answer["quantities"]):
        parts = [g["quantities"][i] for g in groups]
        if any(p["timestamp"] != period["timestamp"] for p in parts):
            return f"groups' periods differ at {period['timestamp']}"
        summed = math.fsum(p["quantity"] for p in parts)
        if not _close(summed, period["quantity"]):
            return f"groups sum to {summed} on {period['timestamp']}"
    return None


# ---- dimensions_ingest ----------------------------------------------------------------------

REQUEST_EVENTS = 1_000  # ingest_http's batch
IN_FLIGHT = 8  # ingest_http's concurrency
INGEST_FULL = {"runs": 5, "requests": 1_000, "warmup_requests": 20, "distinct_requests": 100}
INGEST_QUICK = {"runs": 2, "requests": 40, "warmup_requests": 5, "distinct_requests": 10}
# Of `METERS`, one of each aggregation a dimension applies to.
DIMENSIONED_METERS = (
    "LLM requests",
    "Total tokens",
    "Average tokens per request",
    "Smallest prompt",
    "Largest request",
)
assert set(DIMENSIONED_METERS) <= {m["name"] for m in METERS}
ORG = "6d4c4b4e-5f5a-4c43-9a6c-1c7e0f3b2a10"
MERGE_WAIT_SECONDS = 300.0
AGGREGATE_SQL = {"count": "count(*)", "sum": "sum(v)", "avg": "avg(v)", "min": "min(v)"}
AGGREGATE_SQL["max"] = "max(v)"


def dimensions_ingest(quick: bool = False) -> dict[str, Any]:
    """Ingest with 10 meters, 5 of them with 3 dimensions of 20 values, keeps ≥ 0.8× the events
    per core-second of the same 10 meters without dimensions.

    Hypothesis (issue 64's bar): what dimensions add to applying and storing a batch (the
    dimensioned meters' rollups kept per dimension values, written by the flusher and merged)
    costs at most a fifth of the store's events per core-second.
    """
    return _ingest(INGEST_QUICK if quick else INGEST_FULL)


def _ingest(plan: dict[str, int]) -> dict[str, Any]:
    started = time.perf_counter()
    templates = _ingest_templates(plan["distinct_requests"])
    build_seconds = time.perf_counter() - started
    warmup = plan["warmup_requests"]
    # The process's first stores pay for what loads once (DuckDB's and ours): not in a run.
    tables = list(_fresh(templates, 2 * warmup, "warm"))
    for dimensioned in (True, False):
        asyncio.run(
            _ingest_run(tables, [Encoded(t).data for t in tables], dimensioned, warmup, False)
        )
    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    checks: dict[str, Any] = {}
    for i in range(plan["runs"]):
        tables = list(_fresh(templates, warmup + plan["requests"], f"r{i}"))
        # What the edge's validation hands the embedded publisher with the events.
        bodies = [Encoded(t).data for t in tables]
        for key in ("with", "without") if i % 2 == 0 else ("without", "with"):
            check = i == plan["runs"] - 1 and key == "with"
            result = asyncio.run(_ingest_run(tables, bodies, key == "with", warmup, check))
            if check:
                checks = result.pop("checks")
            runs[key].append(result)
        with_, without = runs["with"][-1], runs["without"][-1]
        print(
            f"   run {i + 1}: with dimensions {with_['events_per_core_second']:,.0f} events per"
            f" core-second ({with_['cores']:.2f} cores), without"
            f" {without['events_per_core_second']:,.0f} ({without['cores']:.2f} cores):"
            f" {with_['events_per_core_second'] / without['events_per_core_second']:.3f}x",
            flush=True,
        )

    def median(key: str, field: str) -> float:
        return float(statistics.median(r[field] for r in runs[key]))

    with_rate = median("with", "events_per_core_second")
    without_rate = median("without", "events_per_core_second")
    pairs = [
        w["events_per_core_second"] / wo["events_per_core_second"]
        for w, wo in zip(runs["with"], runs["without"], strict=True)
    ]
    events = runs["with"][0]["events"]
    metrics = [
        metric(
            "ingest events per core-second with 5 of 10 meters dimensioned / without",
            with_rate / without_rate,
            "x",
            ">=",
            TARGET_INGEST_RATIO,
        ),
        metric("ingest events per core-second, dimensioned (median)", with_rate, "events"),
        metric("ingest events per core-second, no dimensions (median)", without_rate, "events"),
        metric("the same ratio, median of the runs' ratios", statistics.median(pairs), "x"),
        metric(
            "CPU added by dimensions per event",
            (1 / with_rate - 1 / without_rate) * 1e6,
            "µs",
        ),
        metric("ingest events/s, dimensioned (median)", median("with", "events_per_s"), "events/s"),
        metric(
            "ingest events/s, no dimensions (median)", median("without", "events_per_s"), "events/s"
        ),
        metric(
            "dimensioned store: meters disagreeing with events, groups disagreeing with SQL",
            checks["rollups"]["disagreeing"] + checks["groups"]["disagreeing"],
            "count",
            "==",
            0,
        ),
    ]
    return {
        "metrics": metrics,
        "details": {
            "plan": plan,
            "events_per_run": events,
            "request_events": REQUEST_EVENTS,
            "in_flight": IN_FLIGHT,
            "customers": CUSTOMERS,
            "dimensioned_meters": list(DIMENSIONED_METERS),
            "dimensions": list(DIMENSIONS),
            "event_build_seconds": round(build_seconds, 2),
            "runs": runs,
            "ratios": [round(r, 3) for r in pairs],
            "checks": checks,
        },
    }


def _ingest_templates(distinct: int) -> list[pa.Table]:
    """`distinct` requests of `REQUEST_EVENTS` events as ingest validates them (the ingest
    rules, Arrow columns), built once, untimed; customers Zipf-like over 10,000 as in
    core_apply."""
    rng = random.Random(SHUFFLE_SEED)
    weights = list(itertools.accumulate(1 / (k + 1) ** 0.8 for k in range(CUSTOMERS)))
    now = datetime.now(UTC)
    tables = []
    for b in range(distinct):
        who = rng.choices(range(CUSTOMERS), cum_weights=weights, k=REQUEST_EVENTS)
        body = {
            "events": [
                dimensioned_event(rng, f"t{b}-{i}", who[i], now) for i in range(REQUEST_EVENTS)
            ]
        }
        events = parse_ingest_body(
            orjson.loads(orjson.dumps(body)), now=now_us(), rules=EventRules()
        )
        tables.append(to_table(events))
    return tables


def _fresh(templates: list[pa.Table], count: int, tag: str) -> Any:
    """`count` requests of the templates in turn, each with external ids of its own."""
    column = templates[0].schema.get_field_index("external_id")
    for n in range(count):
        table = templates[n % len(templates)]
        ids = pa.array([f"{tag}-{n}-{j}" for j in range(table.num_rows)], pa.string())
        yield table.set_column(column, "external_id", ids)


async def _ingest_run(
    tables: list[pa.Table], bodies: list[bytes], dimensioned: bool, warmup: int, check: bool
) -> dict[str, Any]:
    """A fresh store with the 10 meters (5 `dimensioned` or none), `warmup` requests untimed,
    then the rest timed until stored and merged."""
    with tempfile.TemporaryDirectory(prefix="meterline-bench-dimensions-") as tmp:
        async with Store(Path(tmp) / "ingest.duckdb") as store:
            made = await _create_meters(store, dimensioned)
            await _send(store, tables[:warmup], bodies[:warmup])
            await store.stored()
            await _merged(store)
            cpu, started = time.process_time(), time.perf_counter()
            await _send(store, tables[warmup:], bodies[warmup:])
            await store.stored()
            merge_wait = await _merged(store)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            events = sum(t.num_rows for t in tables[warmup:])
            result: dict[str, Any] = {
                "events": events,
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu, 3),
                "cores": round(cpu / seconds, 2),
                "events_per_s": round(events / seconds, 1),
                "events_per_core_second": round(events / cpu, 1),
                "merge_wait_seconds": round(merge_wait, 2),
                "merges": store.merger.merges,
                "flushes": store.live.flusher.flushes,
            }
            if check:
                result["checks"] = {
                    "rollups": await store.read(check_rollups, ORG),
                    "groups": await _check_groups(store, [m for m in made if m.dimensions]),
                }
    return result


async def _create_meters(store: Store, dimensioned: bool) -> list[MeterRow]:
    made = []
    for definition in METERS:
        if dimensioned and definition["name"] in DIMENSIONED_METERS:
            definition = definition | {"dimensions": list(DIMENSIONS)}
        made.append(
            await store.write(
                create_job(
                    ORG,
                    MeterCreate.model_validate(definition),
                    now_us(),
                    meter_id=str(uuid.uuid4()),
                )
            )
        )
    return made


async def _send(store: Store, tables: list[pa.Table], bodies: list[bytes]) -> None:
    """The requests as the embedded publisher applies them (after validation), `IN_FLIGHT` at a
    time: the writer groups those waiting into one commit."""
    pending = iter(zip(tables, bodies, strict=True))

    async def worker() -> None:
        for table, body in pending:
            at = now_us()
            prepared = await store.prepare(ORG, with_origin(table, ORG, at))
            job = IngestJob(ORG, table, at, body, prepared)
            result = await store.write(job, weight=max(1, table.num_rows), tenant=ORG)
            if result.inserted != table.num_rows:
                raise RuntimeError(f"inserted {result.inserted} of {table.num_rows}")

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def _merged(store: Store) -> float:
    """Waits until no merge of segments is due (the merger takes one up within its check
    interval, and what it merges is the run's own cost); the seconds waited."""
    started = time.perf_counter()
    while store.live.segments.due():
        if time.perf_counter() - started > MERGE_WAIT_SECONDS:
            raise RuntimeError(f"merges still due after {MERGE_WAIT_SECONDS:.0f} s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def _check_groups(store: Store, dimensioned: list[MeterRow]) -> dict[str, Any]:
    """Each dimensioned meter's quantities grouped by each dimension over everything stored,
    for the heaviest customer and a middle one, against SQL aggregates over their events."""
    problems: list[str] = []
    compared = 0
    for customer in (_name(0), _name(100)):
        lo, hi = await store.read(_span_of, customer)
        window = meter_service.QuantityWindow(lo, hi, "day", UTC_ZONE)
        for meter in dimensioned:
            for name in DIMENSIONS:
                answer = await _grouped(store, ORG, meter.id, window, customer, name)
                assert answer.groups is not None
                got = {values[name]: total for values, _, total in answer.groups}
                want = await store.read(_aggregate_groups, meter, customer, name, (lo, hi))
                compared += 1
                if not _same_groups(got, want):
                    problems.append(f"{meter.name}, {customer} by {name}: {got} != {want}")
    return {"compared": compared, "disagreeing": len(problems), "samples": problems[:5]}


def _span_of(con: Con, customer: str) -> tuple[int, int]:
    row = con.execute(
        "SELECT epoch_us(min(timestamp)), epoch_us(max(timestamp)) FROM events"
        " WHERE external_customer_id = ?",
        [customer],
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _aggregate_groups(
    con: Con, meter: MeterRow, customer: str, name: str, window: tuple[int, int]
) -> dict[str | None, float]:
    """The oracle: the meter's aggregate (none of these meters filters) per value of
    dimension `name` over the customer's events in [start, end], by plain SQL."""
    prop = getattr(meter.aggregation, "property", None)
    value = "NULL" if prop is None else f"CAST(json_extract(metadata, '$.{prop}') AS DOUBLE)"
    rows = con.execute(
        f"SELECT json_extract_string(metadata, ?) AS g, {AGGREGATE_SQL[meter.aggregation.func]}"
        f" FROM (SELECT metadata, {value} AS v FROM events WHERE organization_id = ?::UUID"
        " AND external_customer_id = ? AND timestamp >= make_timestamptz(?)"
        " AND timestamp <= make_timestamptz(?)) GROUP BY g",
        ["$." + name, meter.organization_id, customer, *window],
    ).fetchall()
    return {row[0]: float(row[1]) for row in rows}
