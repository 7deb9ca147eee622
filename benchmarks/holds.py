"""hold_latency: how long a hold takes to be answered, beside a balance check on the same server.

Hypothesis: a hold (`POST /v1/meter-holds/`) gates a customer's request as it happens, so it
must answer about as fast as the balance check it replaces: p99 ≤ 10 ms embedded, ≤ 30 ms in
Kafka mode asked of a core (issue 61's bars), one after another from one client.

Each round: a fresh server (embedded: `meterline up`; Kafka: a Tansu broker with memory storage
and `meterline core` leading, asked directly), a sum meter, a customer credited 10⁹ units; then
from one client on loopback, one request at a time, a hold of one unit (a new `external_id`
each) and a balance check of one unit (`GET /v1/customer-meters/check`) of the same customer
meter, alternately, so that both meet the same moments of the server; 20 of each first,
untimed. `ROUNDS` rounds per mode (`--quick`: one, fewer requests); each figure is the median
over rounds of the round's percentile.

    .venv/bin/python -m benchmarks.run hold_latency
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import metric, percentile
from benchmarks.kafka import create_token, kafka_args
from benchmarks.server import Server
from tests.deadline import wait_for
from tests.processes import Broker

TARGETS_P99_MS = {"embedded": 10.0, "kafka": 30.0}  # issue 61's bars
FULL = {"rounds": 3, "requests": 500}
QUICK = {"rounds": 1, "requests": 40}
WARMUP = 20
METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


@contextlib.contextmanager
def served(mode: str, *extra: str) -> Iterator[Server]:
    """A fresh server of `mode` ("embedded": `meterline up`; "kafka": `meterline core` leading
    on a broker of its own), its token set."""
    if mode == "embedded":
        with Server(*extra) as server:
            yield server
        return
    work = Path(tempfile.mkdtemp(prefix="meterline-holds-"))
    try:
        with Broker() as broker:
            token, _ = create_token(work)
            with Server(*kafka_args(broker), *extra, command="core", data_dir=work) as core:
                core.token = token
                wait_for(
                    "the core to lead", lambda: any("this core leads" in x for x in core.output)
                )
                yield core
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(client: httpx.Client) -> dict[str, str]:
    """A meter and a customer credited enough for every hold: the customer meter's ids."""
    answer = client.post("/v1/meters/", json=METER)
    assert answer.status_code == 201, answer.text
    meter = answer.json()["id"]
    answer = client.post("/v1/customers/", json={"email": "ada@example.com", "external_id": "ada"})
    assert answer.status_code == 201, answer.text
    ref = {"customer_id": answer.json()["id"], "meter_id": meter}
    grant = {**ref, "units": 10**9, "external_id": "grant"}
    answer = client.post("/v1/meter-credits/", json=grant)
    assert answer.status_code == 201, answer.text
    return ref


def timed_hold(client: httpx.Client, ref: dict[str, str], external_id: str) -> float:
    started = time.perf_counter()
    answer = client.post("/v1/meter-holds/", json={**ref, "units": 1, "external_id": external_id})
    elapsed = time.perf_counter() - started
    assert answer.status_code == 201, answer.text
    return elapsed


def timed_check(client: httpx.Client, ref: dict[str, str]) -> float:
    started = time.perf_counter()
    answer = client.get("/v1/customer-meters/check", params={**ref, "units": 1})
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    return elapsed


def _round(mode: str, requests: int) -> dict[str, list[float]]:
    with served(mode) as server, server.client() as client:
        ref = prepare(client)
        for i in range(WARMUP):
            timed_hold(client, ref, f"warm-{i}")
            timed_check(client, ref)
        holds, checks = [], []
        for i in range(requests):
            holds.append(timed_hold(client, ref, f"hold-{i}"))
            checks.append(timed_check(client, ref))
    return {"hold": holds, "check": checks}


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    rounds: dict[str, list[dict[str, list[float]]]] = {"embedded": [], "kafka": []}
    for i in range(plan["rounds"]):
        for mode, done in rounds.items():
            done.append(_round(mode, plan["requests"]))
            found = done[-1]
            print(
                f"   {mode}, round {i + 1}: hold p50 {_ms(found['hold'], 50)} ms,"
                f" p99 {_ms(found['hold'], 99)} ms; check p50 {_ms(found['check'], 50)} ms,"
                f" p99 {_ms(found['check'], 99)} ms",
                flush=True,
            )

    def median(mode: str, kind: str, q: float) -> float:
        return statistics.median(_ms(r[kind], q) for r in rounds[mode])

    metrics = []
    for mode in rounds:
        hold_p99, check_p99 = median(mode, "hold", 99), median(mode, "check", 99)
        metrics += [
            metric(f"{mode}: hold p50", median(mode, "hold", 50), "ms"),
            metric(f"{mode}: hold p99", hold_p99, "ms", "<=", TARGETS_P99_MS[mode]),
            metric(f"{mode}: balance check p50", median(mode, "check", 50), "ms"),
            metric(f"{mode}: balance check p99", check_p99, "ms"),
            metric(f"{mode}: hold p99 / check p99", hold_p99 / check_p99, "x"),
        ]
    return {
        "metrics": metrics,
        "details": {
            "rounds": plan["rounds"],
            "requests_per_round": plan["requests"],
            "per_round_ms": {
                mode: [
                    {f"{kind} p{q}": _ms(r[kind], q) for kind in r for q in (50, 90, 99, 100)}
                    for r in done
                ]
                for mode, done in rounds.items()
            },
        },
    }


def _ms(seconds: list[float], q: float) -> float:
    return round(percentile(seconds, q) * 1000, 2)
