"""hold_latency: how long a hold takes to be answered, beside a balance check on the same server.

Hypothesis: a hold (`POST /v1/meter-holds/`) gates a customer's request as it happens, so it
must answer about as fast as the balance check it replaces: p99 ≤ 5 ms embedded, ≤ 15 ms in
Kafka mode asked of a core, and ≤ 3× the check's p99 (issue 81's bars), one after another from
one client.

Each round: a fresh server (embedded: `meterline up`; Kafka: a Tansu broker with memory storage
and `meterline core` leading, asked directly), a sum meter, a customer credited 10⁹ units; then
from one client on loopback, one request at a time, a hold of one unit (a new `external_id`
each) and a balance check of one unit (`GET /v1/customer-meters/check`) of the same customer
meter, alternately, so that both meet the same moments of the server; 20 of each first,
untimed. `ROUNDS` rounds per mode (`--quick`: one, fewer requests); each figure is the median
over rounds of the round's percentile.

    .venv/bin/python -m benchmarks.run hold_latency

Where a hold's time goes (`profile`: py-spy samples a server while it answers holds):

    .venv/bin/python -m benchmarks.holds embedded 400 /tmp/holds.txt   # or kafka
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import metric, percentile
from benchmarks.kafka import create_token, kafka_args
from benchmarks.server import Server
from tests.deadline import next_of, wait_for
from tests.processes import Broker

TARGETS_P99_MS = {"embedded": 5.0, "kafka": 15.0}  # issue 81's bars
TARGET_RATIO = 3.0  # a hold's p99 over a balance check's, in the same run (issue 81)
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
            metric(f"{mode}: hold p99 / check p99", hold_p99 / check_p99, "x", "<=", TARGET_RATIO),
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


# ---- where a hold's time goes ---------------------------------------------------------------

PROFILE_RATE = 200  # py-spy's samples a second, of each thread
OWN_CODE = re.compile(r"\((?:aggregator|meters|ingest)/[^)]*\)")


def profile(mode: str, holds: int, output: Path) -> str:
    """Where a hold's time goes, as a table: `holds` holds one after another from one client
    (after the warm-up) on a fresh server of `mode`, sampled by py-spy.

    1. py-spy samples every thread of the server, idle ones too (wall time: a `COMMIT` waiting
       on its `fsync` counts), without pausing it (`--nonblocking`); its collapsed stacks go to
       `output`.
    2. Each sample is put to the innermost frame of meterline's own code on its stack (function
       and line: the statement the thread runs or waits in) and its caller's function; the
       threads of a pool are one.
    3. A frame's time per hold is its samples / `PROFILE_RATE` / `holds`. Each thread's most
       sampled frame is where it waits for work: its row is what is left of a hold's wall time
       once the thread's other rows are counted (the server also sat idle around the holds).
    """
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}")
    if spy is None:
        print("py-spy is not installed: pip install py-spy, then run this again", file=sys.stderr)
        raise SystemExit(2)
    with served(mode) as server, server.client() as client:
        ref = prepare(client)
        for i in range(WARMUP):
            timed_hold(client, ref, f"warm-{i}")
        options = ("--rate", str(PROFILE_RATE), "--format", "raw", "--idle", "--threads")
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(server.pid), *options, "--nonblocking", "-o", str(output)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        said: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_relay, args=(sampler, said), daemon=True).start()
        next_of("py-spy to start sampling", said)  # "py-spy> Sampling process ..."
        started = time.perf_counter()
        times = [timed_hold(client, ref, f"hold-{i}") for i in range(holds)]
        wall = time.perf_counter() - started
        sampler.send_signal(signal.SIGINT)
        wait_for("py-spy to write its profile", lambda: sampler.poll() is not None)
    if sampler.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed (exit {sampler.returncode})")
    return breakdown(output.read_text(), holds, wall, times, os.getloadavg()[0])


def _relay(process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)


def breakdown(stacks: str, holds: int, wall: float, times: list[float], load: float) -> str:
    """The table of `profile`'s docstring, from py-spy's collapsed stacks."""
    found: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in stacks.splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): |_\d+$", "", frames[0])
        own = [f for f in frames[1:] if OWN_CODE.search(f)]
        # The caller too: a shared helper (`first_row`) runs the statements of many callers.
        where = f"{_short(own[-2])} > {own[-1]}" if len(own) > 1 else "".join(own)
        found[thread][where or "(outside meterline)"] += int(count)
    per_hold = wall / holds * 1000
    rows = [
        f"{holds} holds one after another: {per_hold:.1f} ms each (wall),"
        f" p50 {_ms(times, 50)} ms, p99 {_ms(times, 99)} ms; load average {load:.1f}",
        "ms per hold  thread: caller > innermost frame of meterline's code",
    ]
    for thread, counted in sorted(found.items(), key=lambda t: -sum(t[1].values())):
        (waiting, _), *busy = counted.most_common()
        busy_ms = {f: n / PROFILE_RATE / holds * 1000 for f, n in busy}
        shown = {f: ms for f, ms in busy_ms.items() if ms >= 0.05}
        rows.append(f"{per_hold - sum(busy_ms.values()):10.2f}  {thread}: waiting, {waiting}")
        rows += [f"{ms:10.2f}  {thread}: {f}" for f, ms in shown.items()]
        rows.append(f"{sum(busy_ms.values()) - sum(shown.values()):10.2f}  {thread}: the rest")
    return "\n".join(rows)


def _short(frame: str) -> str:
    """`name (path/module.py:line)` as `module.name`."""
    name, where = frame.split(" (", 1)
    return f"{Path(where.split(':')[0]).stem}.{name}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.holds", description="Where a hold's time goes (py-spy)."
    )
    parser.add_argument("mode", choices=list(TARGETS_P99_MS))
    parser.add_argument("holds", type=int, help="how many holds are sampled (400 in the docs)")
    parser.add_argument("profile", type=Path, help="py-spy's collapsed stacks are written here")
    args = parser.parse_args()
    print(profile(args.mode, args.holds, args.profile))
