"""HTTP ingest throughput of one embedded `meterline up` process.

Hypothesis: a single `meterline up` (embedded DuckDB store) accepts at least 100,000 realistic LLM
usage events/s over `POST /v1/events/ingest`, in batches of 1,000 with 8 requests in flight, with
zero errors, and every acknowledged event is stored (the count after a SIGTERM shutdown equals
the number acknowledged).

Command: `.venv/bin/python -m benchmarks.run ingest_http` (add `--quick` for a smoke run).

Method: a fresh server on a free loopback port and a temp data dir; a spawned load-generator
process builds all request bodies for a run with orjson *before* the run is timed, then sends
them with an asyncio httpx client. After a warm-up, each run sends a fixed number of batches
(sized from the warm-up rate to last about RUN_SECONDS); events/s = events acknowledged /
wall time from the first send to the last answer. Server CPU is read from /proc around each run,
split into the main thread (the asyncio event loop: HTTP), all other threads (the DuckDB writer
thread and DuckDB's own workers) and the child processes (validation workers: JSON decoding and
the event rules for large bodies).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from benchmarks import loadgen
from benchmarks.common import metric, percentile
from benchmarks.server import Server

TARGET_EVENTS_PER_S = 100_000
BATCH_SIZE = 1_000
CONCURRENCY = 8
RUN_SECONDS = 10.0
FULL = {"warmup_batches": 30, "runs": 5, "min_batches": 50, "max_batches": 1_500}
QUICK = {"warmup_batches": 5, "runs": 2, "min_batches": 20, "max_batches": 20}


class LoadGenerator:
    """The spawned load-generator process and the timed run around it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        # spawn, not fork: the child must not inherit the parent's threads or imports' state.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=loadgen.serve,
            args=(child, server.url, server.token, BATCH_SIZE, CONCURRENCY),
            name="meterline-loadgen",
            daemon=True,
        )
        self._proc.start()
        child.close()

    def run(self, tag: str, batches: int, seed: int, rate: float | None = None) -> dict[str, Any]:
        """Build `batches` bodies (untimed), then send them, as fast as answers come back or at
        `rate` events/s."""
        prepared = self.prepare(tag, batches, seed)
        return self.go(prepared, rate)

    def prepare(self, tag: str, batches: int, seed: int) -> dict[str, Any]:
        self._conn.send(("prepare", tag, batches, seed))
        prepared: dict[str, Any] = self._conn.recv()
        return {**prepared, "batches": batches}

    def go(self, prepared: dict[str, Any], rate: float | None = None) -> dict[str, Any]:
        """Send the prepared bodies; blocks until the last answer."""
        total0, loop0, workers0 = self.server.cpu_seconds()
        self._conn.send(("go", rate) if rate else ("go",))
        stats: dict[str, Any] = self._conn.recv()
        total1, loop1, workers1 = self.server.cpu_seconds()
        rss = self.server.memory_kib()["VmRSS"]
        seconds = stats["seconds"]
        behind = stats["behind_schedule"]
        return {
            "batches": prepared["batches"],
            "events": stats["inserted"],
            "seconds": round(seconds, 3),
            "events_per_s": round(stats["inserted"] / seconds, 1),
            "p50_ms": round(percentile(stats["latencies"], 50) * 1000, 2),
            "p99_ms": round(percentile(stats["latencies"], 99) * 1000, 2),
            "errors": stats["errors"],
            "error_samples": stats["error_samples"],
            "duplicates": stats["duplicates"],
            # CPU cores busy on average during the run (2.0 = both cores of this machine).
            "server_cpu_cores": round((total1 - total0) / seconds, 2),
            "event_loop_cores": round((loop1 - loop0) / seconds, 2),
            "other_threads_cores": round((total1 - total0 - loop1 + loop0) / seconds, 2),
            "validation_workers_cores": round((workers1 - workers0) / seconds, 2),
            "client_cpu_cores": round(stats["client_cpu_seconds"] / seconds, 2),
            # Resident memory after the run: shows growth with the amount stored.
            "server_rss_mib": round(rss / 1024, 1),
            "body_mb": round(prepared["bytes"] / 1e6, 1),
            "prepare_seconds": round(prepared["seconds"], 2),
            "latencies": stats["latencies"],
            **(
                {
                    "rate_events_per_s": rate,
                    "sent_late": len(behind),
                    "behind_schedule_max_ms": round(max(behind, default=0.0) * 1000, 2),
                }
                if rate
                else {}
            ),
        }

    def close(self) -> None:
        self._conn.send(("stop",))
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


def stored_events(server: Server) -> int:
    """Events in the DuckDB file, reopened after the server has exited."""
    with duckdb.connect(str(server.database), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


# Called with the running server before the warm-up, or with the stopped server (its database
# file still there) after the runs; what it returns goes into the details.
Hook = Callable[[Server], dict[str, Any]]


def run(quick: bool = False) -> dict[str, Any]:
    return measure(quick)


def inline(quick: bool = False) -> dict[str, Any]:
    """ingest_http with validation inline (`--validation-workers 0`): does the pool pay for
    its copies?

    Hypothesis: with compiled validation at about two JSON parses per event, validating in
    the server process costs less than shipping each body to a worker process and its columns
    back, so this run is at least as fast as ingest_http's (compare the two tables).
    """
    return measure(quick, server_args=("--validation-workers", "0"))


def measure(
    quick: bool,
    *,
    setup: Hook | None = None,
    verify: Hook | None = None,
    batches: int | None = None,
    server_args: tuple[str, ...] = (),
    checkout: Path | None = None,
) -> dict[str, Any]:
    """The ingest_http benchmark; other benchmarks reuse it with hooks (e.g. to create meters
    first), a fixed number of batches per run (to compare like with like) and server flags."""
    plan = QUICK if quick else FULL
    with Server(*server_args, checkout=checkout) as server:
        prepared = setup(server) if setup else None
        load = LoadGenerator(server)
        try:
            warmup = load.run("warmup", plan["warmup_batches"], seed=0)
            _progress("warm-up", warmup)
            if batches is None:
                # Size runs from the warm-up so each lasts about RUN_SECONDS on this machine.
                wanted = round(warmup["events_per_s"] * RUN_SECONDS / BATCH_SIZE)
                batches = max(plan["min_batches"], min(plan["max_batches"], wanted))
            runs = []
            for i in range(1, plan["runs"] + 1):
                runs.append(load.run(f"run{i}", batches, seed=i))
                _progress(f"run {i}/{plan['runs']}", runs[-1])
        finally:
            load.close()
        memory = server.memory_kib()
        api_count = server.total_count()
        exit_code = server.stop()
        wal = server.database.with_name(server.database.name + ".wal")
        # A clean close checkpoints the WAL into the database file; a leftover WAL means it did not.
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        reopen_started = time.perf_counter()
        stored = stored_events(server)  # replays any WAL left behind: that is a restart's cost
        reopen_seconds = time.perf_counter() - reopen_started
        stop_seconds = server.stop_seconds
        verified = verify(server) if verify else None

    acknowledged = warmup["events"] + sum(r["events"] for r in runs)
    latencies = [x for r in runs for x in r.pop("latencies")]
    warmup.pop("latencies")
    rates = [r["events_per_s"] for r in runs]
    errors = warmup["errors"] + sum(r["errors"] for r in runs)
    # Strict: both the API (before the stop) and the reopened file must have every event.
    lost = acknowledged - min(stored, api_count)
    metrics = [
        metric(
            "events/s (median of runs)",
            statistics.median(rates),
            "events/s",
            ">=",
            TARGET_EVENTS_PER_S,
        ),
        metric("events/s (slowest run)", min(rates), "events/s"),
        metric("request latency p50", percentile(latencies, 50) * 1000, "ms"),
        metric("request latency p99", percentile(latencies, 99) * 1000, "ms"),
        metric("server peak RSS (VmHWM)", memory["VmHWM"] / 1024, "MiB"),
        metric("server CPU (median of runs)", _median(runs, "server_cpu_cores"), "cores"),
        metric("event loop thread CPU (median)", _median(runs, "event_loop_cores"), "cores"),
        metric(
            "validation workers CPU (median)", _median(runs, "validation_workers_cores"), "cores"
        ),
        metric("load generator CPU (median)", _median(runs, "client_cpu_cores"), "cores"),
        metric("errors", errors, "requests", "==", 0),
        metric("acknowledged but not stored", lost, "events", "==", 0),
    ]
    hooks = {"setup": prepared, "verify": verified}
    return {
        "metrics": metrics,
        "details": {
            **{key: value for key, value in hooks.items() if value is not None},
            "mode": "quick" if quick else "full",
            "batch_size": BATCH_SIZE,
            "concurrency": CONCURRENCY,
            "runs": runs,
            "warmup": warmup,
            "acknowledged_events": acknowledged,
            "api_total_count": api_count,
            "stored_events_after_restart": stored,
            "server_exit_code": exit_code,
            "server_stop_seconds": round(stop_seconds or 0.0, 2),
            "wal_bytes_after_stop": wal_bytes,
            "reopen_seconds": round(reopen_seconds, 2),
            "server_memory_kib": memory,
            # The token dies with the temp data dir, but results are committed: redact it.
            "server_output_tail": [
                line.replace(server.token or "<none>", "<token>") for line in server.output[-20:]
            ],
        },
    }


def _progress(label: str, r: dict[str, Any]) -> None:
    print(
        f"   {label}: {r['events']:,} events in {r['seconds']:.2f} s = {r['events_per_s']:,.0f}"
        f" events/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, errors {r['errors']},"
        f" server {r['server_cpu_cores']:.2f} cores, RSS {r['server_rss_mib']:,.0f} MiB",
        flush=True,
    )


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))
