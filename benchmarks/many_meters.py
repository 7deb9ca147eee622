"""An organization with thousands of meters, defined as users define them: what a request of it
costs, and what it costs another organization.

Meters are made over the API on a running `meterline up`: one meter per model, per route, per
model and region, per route and region (filters on the event's name and on metadata
properties, `eq`, `like`, `gt`), each filter shared by several aggregations (count, sum, max,
avg, unique), as a user keeps one meter per figure they bill or watch. Tenant A (5,000 such
meters) sends two 100-event requests a second; tenant B (no meters) sends 50 requests/s of 100
events (`tests.tenants.steady`), alone and beside A. Runs alternate alone / beside; B's figures
are medians over runs, A's quantiles over all its requests.

Hypothesis: A's 100-event request is answered within 1 s at p99, and B's p99 beside A stays
within 2x its p99 alone.

Command: `.venv/bin/python -m benchmarks.run many_meters` (`--quick` for a smoke run).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from aggregator.store.metering.meter_plan import MeterPlan
from benchmarks.common import metric
from benchmarks.server import Server
from meters.definitions import MeterCreate
from tests import tenants
from tests.processes import new_org_token

FULL = {"runs": 3, "seconds": 10.0, "meters": 5000}
QUICK = {"runs": 1, "seconds": 2.0, "meters": 500}
# Tenant A's pace: two requests of 100 events a second.
A_EVERY_SECONDS = 0.5

MODELS = [f"model-{i}" for i in range(40)]
ROUTES = [f"/v1/route-{i}" for i in range(60)]
REGIONS = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"]
NAMES = ("llm.completion", "api.request")


def _clause(prop: str, value: Any, operator: str = "eq") -> dict[str, Any]:
    return {"property": prop, "operator": operator, "value": value}


def _filter(*clauses: dict[str, Any]) -> dict[str, Any]:
    return {"conjunction": "and", "clauses": list(clauses)}


def meter_definitions(count: int) -> list[dict[str, Any]]:
    """`count` meter definitions (`POST /v1/meters/` bodies), the same for the same count."""
    llm = _clause("name", "llm.completion")
    api = _clause("name", "api.request")
    per_llm = [
        {"func": "count"},
        {"func": "sum", "property": "tokens"},
        {"func": "sum", "property": "_cost.amount"},
        {"func": "max", "property": "latency_ms"},
        {"func": "unique", "property": "user"},
    ]
    per_api = [
        {"func": "count"},
        {"func": "sum", "property": "bytes"},
        {"func": "avg", "property": "latency_ms"},
        {"func": "max", "property": "latency_ms"},
    ]
    groups: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []
    groups += [(m, _filter(llm, _clause("model", m)), per_llm) for m in MODELS]
    groups += [(r, _filter(api, _clause("route", r)), per_api) for r in ROUTES]
    groups += [
        (f"{m} {g}", _filter(llm, _clause("model", m), _clause("region", g)), per_llm[:3])
        for m in MODELS
        for g in REGIONS
    ]
    groups += [
        (f"{r} {g}", _filter(api, _clause("route", r), _clause("region", g)), per_api[:2])
        for r in ROUTES
        for g in REGIONS
    ]
    groups += [
        (f"big {m}", _filter(_clause("model", m), _clause("tokens", 1000, "gt")), per_llm[:2])
        for m in MODELS
    ]
    groups += [
        (f"{r} {m}", _filter(_clause("route", r, "like"), _clause("model", m)), per_llm[:2])
        for r in ROUTES
        for m in MODELS
    ]
    definitions = [
        {
            "name": f"{label} {a['func']} {a.get('property', '')}".strip(),
            "filter": f,
            "aggregation": a,
        }
        for label, f, aggregations in groups
        for a in aggregations
    ]
    assert len(definitions) >= count, len(definitions)
    return definitions[:count]


def events_body(tag: str, count: int, rng: random.Random) -> bytes:
    """`count` events of both names over 100 customers, with the properties the meters read."""
    events = []
    for i in range(count):
        name = NAMES[0] if rng.random() < 0.7 else NAMES[1]
        metadata: dict[str, Any] = {
            "model": rng.choice(MODELS),
            "route": rng.choice(ROUTES),
            "region": rng.choice(REGIONS),
            "tokens": rng.randint(1, 4000),
            "latency_ms": round(rng.uniform(5, 900), 3),
            "user": f"user-{rng.randint(0, 500)}",
            "bytes": rng.randint(100, 100_000),
        }
        if name == NAMES[0]:
            metadata["_cost"] = {"amount": f"{rng.uniform(0, 2):.6f}", "currency": "usd"}
        events.append(
            {
                "name": name,
                "external_customer_id": f"customer-{rng.randint(0, 99)}",
                "external_id": f"{tag}-{i}",
                "metadata": metadata,
            }
        )
    return orjson.dumps({"events": events})


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    count = int(plan["meters"])
    details: dict[str, Any] = {"plan": plan, **_shape(count)}
    data_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
    try:
        a = new_org_token(data_dir, "many-meters")
        b = new_org_token(data_dir, "other")
        with Server("--max-meters-per-organization", "10000", data_dir=data_dir) as server:
            started = time.perf_counter()
            make_meters(server.url, a, count)
            details["seconds_to_make_meters"] = round(time.perf_counter() - started, 1)
            tenants.steady(server.url, b, "warm", seconds=1)
            rows = _measured(server.url, a, b, plan)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    solo = statistics.median(m.p99_ms for m in rows["solo"])
    beside = statistics.median(m.p99_ms for m in rows["beside"])
    a_ms = sorted(rows["a_ms"])
    statuses = rows["a_statuses"]
    details.update(
        {
            "b_solo_p99_ms": [m.p99_ms for m in rows["solo"]],
            "b_beside_p99_ms": [m.p99_ms for m in rows["beside"]],
            "b_beside_statuses": [m.statuses for m in rows["beside"]],
            "a_request_ms": [round(x, 1) for x in rows["a_ms"]],
            "a_statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        }
    )
    return {
        "metrics": [
            metric(f"A 100-event request ({count} meters), p50", _quantile(a_ms, 0.5), "ms"),
            metric(
                f"A 100-event request ({count} meters), p99",
                _quantile(a_ms, 0.99),
                "ms",
                "<=",
                1000.0,
            ),
            metric("A requests answered 200", statuses.count(200) / len(statuses), "ratio"),
            metric("B p99 alone", solo, "ms"),
            metric(f"B p99 beside A ({count} meters)", beside, "ms"),
            metric("B p99 beside A / alone", beside / solo, "ratio", "<=", 2.0),
            metric(
                "B success beside A",
                min(m.succeeded / m.sent for m in rows["beside"]),
                "ratio",
            ),
        ],
        "details": details,
    }


def _shape(count: int) -> dict[str, int]:
    """How much of the meters is shared: distinct filters, clauses and contributions."""
    parsed = [MeterCreate.model_validate(d) for d in meter_definitions(count)]
    plan = MeterPlan.of([(m.filter, m.aggregation) for m in parsed])
    filters = {m.filter.model_dump_json() for m in parsed}
    return {
        "meters": count,
        "distinct_filters": len(filters),
        "distinct_clauses": plan.clauses,
        "distinct_contributions": len(plan.columns) - plan.clauses,
    }


def _measured(url: str, a: str, b: str, plan: dict[str, float]) -> dict[str, Any]:
    """Runs alternating B alone and B beside A's requests."""
    seconds = plan["seconds"]
    rows: dict[str, Any] = {"solo": [], "beside": [], "a_ms": [], "a_statuses": []}
    for run_ in range(int(plan["runs"])):
        rows["solo"].append(tenants.steady(url, b, f"s{run_}", seconds=seconds))
        stop = threading.Event()
        heavy = threading.Thread(target=_heavy, args=(url, a, f"h{run_}", stop, rows))
        heavy.start()
        try:
            rows["beside"].append(tenants.steady(url, b, f"b{run_}", seconds=seconds))
        finally:
            stop.set()
            heavy.join()
    return rows


def _heavy(url: str, token: str, tag: str, stop: threading.Event, rows: dict[str, Any]) -> None:
    """A 100-event request every `A_EVERY_SECONDS` (the next at once if one took longer) until
    `stop`, each one's latency in ms and status."""
    rng = random.Random(tag)
    with httpx.Client(base_url=url, headers=_auth(token), timeout=60) as client:
        sent = 0
        while not stop.is_set():
            body = events_body(f"{tag}-{sent}", 100, rng)
            started = time.perf_counter()
            answer = client.post(
                "/v1/events/ingest", content=body, headers={"Content-Type": "application/json"}
            )
            rows["a_ms"].append((time.perf_counter() - started) * 1000)
            rows["a_statuses"].append(answer.status_code)
            sent += 1
            stop.wait(max(0.0, A_EVERY_SECONDS - (time.perf_counter() - started)))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def make_meters(url: str, token: str, count: int) -> list[str]:
    """The meters of `meter_definitions(count)`, made over the API; their ids."""
    ids = []
    with httpx.Client(base_url=url, headers=_auth(token), timeout=60) as client:
        for definition in meter_definitions(count):
            answer = client.post("/v1/meters/", json=definition)
            answer.raise_for_status()
            ids.append(answer.json()["id"])
    return ids


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
