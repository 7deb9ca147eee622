"""Failover: what a client sees when the core dies, with a standby core and without one.

Hypothesis: with a second core standing by on the same topics, `kill -9` of the leader costs
balance reads sent through an edge nothing (the edge asks the standby), and writes wait for
the takeover only, within 15 s at the default session timeout (6 s); without a standby, a core
restarted at once on its data dir answers neither for as long as it takes to start and lead
again.

Command: `.venv/bin/python -m benchmarks.run takeover` (`--quick`: one run of each).

Each run: a fresh broker (Tansu, memory storage), a core `meterline up --kafka` with a count
meter and a customer with usage, in the `standby` scenario a second core (`meterline core`, its
own data dir, the cluster secret), and an edge (`meterline ingest --core URL` for each core)
that clients talk to. A client asks the balance check (`/v1/customer-meters/check`) of the edge
every 50 ms; one second on, the leader is killed (SIGKILL) and, in `restart`, started again on
the same data dir and port. Measured from the kill: the first write answered (a customer
create sent to the edge, with its request id again after a 504 or a refused connection), the
longest gap between two answered checks over the 20 s after it, and the checks' p99 and
slowest answer over those 20 s. The reference is the same run's other scenario; the session
timeout is the floor of a takeover (the group waits that long for a silent member).
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import metric, percentile
from benchmarks.server import Server
from tests.deadline import wait_for
from tests.processes import Broker

SESSION_SECONDS = 6.0  # the default (`--consumer-session-timeout-seconds`)
WATCH_SECONDS = 20.0
TARGET_TAKEOVER_SECONDS = 15.0


class Checks(threading.Thread):
    """Asks `path` (a read) of one core every 50 ms, in a thread while entered (or between
    `start` and `stop`); keeps when each was asked and whether it was answered (200) within
    `timeout` seconds."""

    def __init__(
        self,
        url: str,
        token: str,
        path: str,
        params: dict[str, Any] | None = None,
        timeout: float = 1.0,
    ) -> None:
        super().__init__(daemon=True)
        self.asked: list[tuple[float, bool]] = []  # (when, answered)
        self.seconds: list[tuple[float, float]] = []  # (when, how long) of each answered
        self._done = threading.Event()
        self._args = (url, token, path, params or {}, timeout)

    def run(self) -> None:
        url, token, path, params, timeout = self._args
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            while not self._done.is_set():
                began = time.monotonic()
                try:
                    ok = client.get(path, params=params).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.asked.append((time.monotonic(), ok))
                if ok:
                    self.seconds.append((began, time.monotonic() - began))
                time.sleep(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join(10)

    def __enter__(self) -> Checks:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def longest_gap(self, since: float, until: float) -> float:
        times = [since, *(t for t, ok in self.asked if ok and since < t < until), until]
        return max(b - a for a, b in itertools.pairwise(times))

    def latency(self, since: float, until: float, q: float) -> float:
        """The `q` percentile of how long answered checks asked in [since, until) took."""
        return percentile([d for t, d in self.seconds if since <= t < until], q)

    def answered(self, since: float, until: float) -> float:
        """The share of checks asked in [since, until) that were answered."""
        window = [ok for t, ok in self.asked if since <= t < until]
        return sum(window) / max(1, len(window))


def write_answered(url: str, token: str, give_up: float) -> float:
    """Seconds until a customer create is answered (inf: not within `give_up`), sent again
    with its request id after a 504 (logged, not yet applied) or a refused connection (a
    core restarting); any other answer is an error."""
    started = time.monotonic()
    key = f"failover-{started}"
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    while time.monotonic() - started < give_up:
        try:
            answer = httpx.post(
                f"{url}/v1/customers/",
                json={"email": f"{key}@example.com"},
                headers=headers,
                timeout=give_up,
            )
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        if answer.status_code == 201:
            return time.monotonic() - started
        if answer.status_code != 504:
            raise RuntimeError(f"a write was answered {answer.status_code}: {answer.text}")
    return float("inf")


def _prepare(core: Server) -> tuple[str, str]:
    """A count meter and a customer with usage; (customer external id, meter id)."""
    headers = {"Authorization": f"Bearer {core.token}"}
    with httpx.Client(base_url=core.url, headers=headers, timeout=60) as client:
        meter = client.post(
            "/v1/meters/",
            json={
                "name": "calls",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": "count"},
            },
        ).json()["id"]
        client.post("/v1/customers/", json={"email": "c@example.com", "external_id": "c"})
        client.post(
            "/v1/meter-credits/",
            json={
                "external_customer_id": "c",
                "meter_id": meter,
                "units": 1000,
                "external_id": "grant",
            },
        )
        events = [{"name": "call", "external_customer_id": "c"} for _ in range(100)]
        client.post("/v1/events/ingest", json={"events": events}).raise_for_status()
        wait_for(
            "the check to be answered",
            lambda: (
                client.get(
                    "/v1/customer-meters/check",
                    params={"external_customer_id": "c", "meter_id": meter, "units": 1},
                ).status_code
                == 200
            ),
        )
    return "c", meter


def _run(scenario: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="meterline-failover-"))
    try:
        with Broker() as broker:
            args = ("--kafka", broker.bootstrap, "--no-idempotence", "--validation-workers", "0")
            core = Server(*args, data_dir=work / "a").start()
            standby: Server | None = None
            edge: Server | None = None
            try:
                wait_for(
                    "the core to lead", lambda: any("this core leads" in x for x in core.output)
                )
                customer, meter = _prepare(core)
                token = core.token
                assert token is not None
                cores = ["--core", core.url]
                if scenario == "standby":
                    secret = work / "cluster.secret"
                    shutil.copy(work / "a" / "secret.key", secret)
                    standby = Server(
                        *args, "--secret-file", str(secret), command="core", data_dir=work / "b"
                    ).start()
                    cores += ["--core", standby.url]
                    wait_for(
                        "the standby to answer writes",
                        lambda: write_answered(standby.url, token, 30) < 30,
                    )

                edge = Server(*args, *cores, command="ingest", data_dir=work / "a").start()
                params = {"external_customer_id": customer, "meter_id": meter, "units": 1}
                checks = Checks(edge.url, token, "/v1/customer-meters/check", params)
                checks.start()
                time.sleep(1)
                core.kill()
                killed = time.monotonic()
                if scenario == "restart":
                    port = core.port
                    core = Server(*args, data_dir=work / "a")
                    core.port, core.url = port, f"http://127.0.0.1:{port}"
                    threading.Thread(target=core.start, daemon=True).start()
                write = write_answered(edge.url, token, 60)
                time.sleep(max(0.0, killed + WATCH_SECONDS - time.monotonic()))
                checks.stop()
                window = (killed, killed + WATCH_SECONDS)
                gap = checks.longest_gap(*window)
                answered = checks.answered(*window)
                p99, slowest = checks.latency(*window, 99), checks.latency(*window, 100)
            finally:
                for server in (edge, standby, core):
                    if server is not None:
                        server.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"   {scenario}: write answered {write:.1f} s after the kill; longest check gap"
        f" {gap:.2f} s; checks answered {answered:.0%} of the 20 s, p99 {p99 * 1000:.0f} ms,"
        f" slowest {slowest:.2f} s",
        flush=True,
    )
    return {
        "write_seconds": round(write, 3),
        "check_gap_seconds": round(gap, 3),
        "checks_answered": round(answered, 4),
        "check_p99_seconds": round(p99, 4),
        "check_slowest_seconds": round(slowest, 4),
    }


def run(quick: bool = False) -> dict[str, Any]:
    runs = 1 if quick else 3
    results: dict[str, list[dict[str, Any]]] = {"standby": [], "restart": []}
    for _ in range(runs):  # interleaved: the machine's load falls on both alike
        for scenario in results:
            results[scenario].append(_run(scenario))

    def median(scenario: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[scenario]))

    standby_write, restart_write = (
        median("standby", "write_seconds"),
        median("restart", "write_seconds"),
    )
    return {
        "metrics": [
            metric(
                "standby: write answered after the leader's kill (median)",
                standby_write,
                "s",
                "<=",
                TARGET_TAKEOVER_SECONDS,
            ),
            metric(
                "standby: write answered after the kill (slowest run)",
                max(r["write_seconds"] for r in results["standby"]),
                "s",
            ),
            metric("standby: takeover / session timeout", standby_write / SESSION_SECONDS, "x"),
            metric(
                "standby: longest gap between answered checks (median)",
                median("standby", "check_gap_seconds"),
                "s",
            ),
            metric(
                "standby: check answered within, p99 over the 20 s after the kill (median)",
                median("standby", "check_p99_seconds") * 1000,
                "ms",
            ),
            metric(
                "standby: slowest check answered over the 20 s after the kill (worst run)",
                max(r["check_slowest_seconds"] for r in results["standby"]),
                "s",
            ),
            metric(
                "standby: checks answered over the 20 s after the kill (worst run)",
                min(r["checks_answered"] for r in results["standby"]) * 100,
                "%",
                ">=",
                99.0,
            ),
            metric(
                "restart (no standby): write answered after the kill (median)", restart_write, "s"
            ),
            metric(
                "restart (no standby): longest gap between answered checks (median)",
                median("restart", "check_gap_seconds"),
                "s",
            ),
            metric(
                "restart (no standby): checks answered over the 20 s (worst run)",
                min(r["checks_answered"] for r in results["restart"]) * 100,
                "%",
            ),
        ],
        "details": {"session_timeout_seconds": SESSION_SECONDS, "runs": results},
    }
