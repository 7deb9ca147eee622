"""Run benchmarks, store each result as JSON and regenerate the results table.

    python -m benchmarks.run [names...] [--quick] [--estimate] [--against COMMIT [--rounds N]]

Each benchmark is a function `run(quick) -> {"metrics": [...], "details": {...}}` registered in
BENCHMARKS; its module docstring states the hypothesis and the command. Results go to
benchmarks/results/<name>.json, and benchmarks/results/README.md is rebuilt from every JSON file
there (so results of benchmarks not rerun stay in the table). `--quick` results go to
benchmarks/results/quick/ (not committed) and leave the table alone. Before starting, the run
says about how long it will take: each benchmark's last recorded duration (`seconds` in its
result), else the one declared in BENCHMARKS.

`--against COMMIT` runs each benchmark here and in a checkout of COMMIT alternately, `--rounds`
times each (3, `--quick`: 1), and reports each metric's medians and their ratio, ours / theirs,
against the metric's ratio bar if it has one (`benchmarks/against.py` says how).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from rich.console import Console

from aggregator.commands.progress import Progress
from benchmarks import (
    against,
    alerts,
    api_writes,
    backups,
    core,
    dimensions,
    export,
    fan_out,
    forwarding,
    grants,
    holds,
    ingest_http,
    isolation,
    kafka,
    ledger,
    live_stream,
    many_meters,
    memory,
    meter_heavy,
    meters,
    otlp,
    pricing,
    replicas,
    restart,
    sdk,
    shards,
    startup,
    takeover,
    timed_meters,
    validation,
    voids,
)

RESULTS = Path(__file__).parent / "results"


class Benchmark(NamedTuple):
    # A module (its `run`) or a function; the hypothesis is the function's docstring, else its
    # module's.
    entry: ModuleType | Callable[[bool], dict[str, Any]]
    # About how long a full and a quick run take on a 2-core machine, in seconds: the estimate
    # until the benchmark has a result that records its own duration. Full: the time between
    # the starts of consecutive benchmarks in the committed runs, or the benchmark's own timed
    # phases; quick: measured.
    full_seconds: int
    quick_seconds: int


BENCHMARKS: dict[str, Benchmark] = {
    "validation": Benchmark(validation, 10, 2),
    "otlp": Benchmark(otlp, 30, 5),
    "ingest_http": Benchmark(ingest_http, 90, 7),
    "ingest_http_inline": Benchmark(ingest_http.inline, 90, 6),
    "ingest_http_meters": Benchmark(meters.ingest_http_meters, 240, 17),
    "rollup_update": Benchmark(meters.rollup_update, 20, 7),
    "core_apply": Benchmark(core, 50, 6),
    "quantities_1m": Benchmark(meters.quantities_1m, 40, 18),
    "quantities_10m": Benchmark(meters.quantities_10m, 110, 18),
    "kafka_ingest_http": Benchmark(kafka.kafka_ingest_http, 220, 16),
    "kafka_consume": Benchmark(kafka.kafka_consume, 140, 17),
    "kafka_freshness": Benchmark(kafka.kafka_freshness, 270, 45),
    "balance_check": Benchmark(ledger.balance_check, 45, 10),
    "balance_check_grants": Benchmark(grants.balance_check_grants, 60, 15),
    "alert_latency": Benchmark(alerts.alert_latency, 90, 25),
    "live_stream_latency": Benchmark(live_stream.live_stream_latency, 70, 30),
    "ledger_cost": Benchmark(ledger.ledger_cost, 30, 6),
    "timed_meters": Benchmark(timed_meters, 40, 8),
    "forward_throughput": Benchmark(forwarding.forward_throughput, 90, 45),
    "reconcile_1m": Benchmark(forwarding.reconcile_1m, 660, 120),
    "sdk_record": Benchmark(sdk.sdk_record, 45, 25),
    "sdk_deliver": Benchmark(sdk.sdk_deliver, 175, 35),
    "isolation": Benchmark(isolation, 120, 25),
    "meter_heavy": Benchmark(meter_heavy, 540, 60),
    "many_meters": Benchmark(many_meters, 240, 40),
    "api_writes": Benchmark(api_writes, 420, 60),
    "hold_latency": Benchmark(holds, 300, 50),
    "restart": Benchmark(restart.restart, 1800, 90),
    "restart_kafka": Benchmark(restart.restart_kafka, 2400, 60),
    "backup_increment": Benchmark(backups, 1800, 120),
    "memory_10m": Benchmark(memory, 1800, 120),
    "takeover": Benchmark(takeover, 300, 100),
    "replicas": Benchmark(replicas, 900, 120),
    "shards": Benchmark(shards, 600, 90),
    "fan_out": Benchmark(fan_out, 600, 90),
    "startup": Benchmark(startup, 150, 30),
    "void_1m": Benchmark(voids, 600, 60),
    "dimensions_10m": Benchmark(dimensions.dimensions_10m, 900, 40),
    "dimensions_ingest": Benchmark(dimensions.dimensions_ingest, 240, 15),
    "export_rate": Benchmark(export.export_rate, 240, 60),
    "export_kills_1m": Benchmark(export.export_kills_1m, 600, 90),
    "export_formats": Benchmark(export.export_formats, 240, 60),
    "pricing_100k": Benchmark(pricing.pricing_100k, 60, 10),
}
ROUNDS, QUICK_ROUNDS = 3, 1  # of an --against run
PACKAGES = ("meterline", "uvicorn", "starlette", "orjson", "pyarrow", "httpx", "aiokafka")
_OPS = {">=": "≥", "<=": "≤", "==": "="}


def machine() -> dict[str, Any]:
    """Enough context to tell whether two results are comparable."""
    # The results folder left out: a run of several benchmarks writes it as it goes.
    diff = _git("diff", "HEAD", "--", ":(top)", ":(top,exclude)benchmarks/results") or ""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "duckdb": metadata.version("duckdb"),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": {p: _version(p) for p in PACKAGES},
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes make the commit alone an incomplete description of the code;
        # the hash of the diff tells two dirty trees apart.
        "git_dirty": bool(diff),
        "git_diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def result_path(results: Path, name: str, quick: bool) -> Path:
    """Where a run's result goes. A quick run is a smoke test: it never replaces a full run's
    result, nor enters the table (which is built from `results`/*.json only)."""
    return results / "quick" / f"{name}.json" if quick else results / f"{name}.json"


def estimate(results: Path, name: str, quick: bool, rounds: int = 0) -> float:
    """Seconds the benchmark is expected to take: as long as its last run of the same mode took,
    else as long as declared; with `rounds` of an --against run, that many on each side."""
    try:
        recorded = json.loads(result_path(results, name, quick).read_text())
    except (OSError, ValueError):
        recorded = {}
    declared = BENCHMARKS[name]
    once = float(
        recorded.get("seconds") or (declared.quick_seconds if quick else declared.full_seconds)
    )
    if recorded.get("seconds") and recorded.get("against"):
        once /= 2 * recorded["against"]["rounds"]  # the seconds of a whole --against run
    return once * 2 * rounds if rounds else once


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def run_one(name: str, quick: bool, results: Path = RESULTS) -> dict[str, Any]:
    entry = BENCHMARKS[name].entry
    bench: Callable[[bool], dict[str, Any]] = entry.run if isinstance(entry, ModuleType) else entry
    doc = (bench.__doc__ or sys.modules[bench.__module__].__doc__ or "").strip()
    started = time.perf_counter()
    result = {
        "benchmark": name,
        "summary": doc.splitlines()[0] if doc else "",
        "mode": "quick" if quick else "full",
        "machine": machine(),
        **bench(quick),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = result_path(results, name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.run` from the JSON files beside this one;"
        " do not edit by hand. See `benchmarks/README.md` for what each number means.",
        "",
        "| benchmark | metric | value | target | met? | against | ratio | ratio bar |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        name = result["benchmark"] + (" (quick)" if result.get("mode") == "quick" else "")
        for m in result["metrics"]:
            target = m["target"]
            goal = f"{_OPS[target['op']]} {fmt(target['value'])} {m['unit']}" if target else ""
            met = "" if m["met"] is None else ("yes" if m["met"] else "**no**")
            other, times, bar = _against_cells(m)
            lines.append(
                f"| {name} | {m['name']} | {fmt(m['value'])} {m['unit']} | {goal} | {met}"
                f" | {other} | {times} | {bar} |"
            )
    lines += ["", "## Runs", ""]
    for result in results:
        mach = result["machine"]
        commit = (mach.get("git_commit") or "unknown")[:12] + (
            " (dirty)" if mach.get("git_dirty") else ""
        )
        other = result.get("against")
        versus = ""
        if other:
            rounds = f"{other['rounds']} round" + ("s" if other["rounds"] != 1 else "")
            versus = f", against {other['commit'][:12]} ({rounds})"
        lines.append(
            f"- **{result['benchmark']}** ({result.get('mode', 'full')}): {mach['date']},"
            f" commit {commit}{versus}, {mach['cpus_usable']} CPUs ({mach['cpu_model']}),"
            f" load {mach['load_average_at_start']}, Python {mach['python']},"
            f" DuckDB {mach['duckdb']}"
        )
    return "\n".join(lines) + "\n"


def _against_cells(m: dict[str, Any]) -> tuple[str, str, str]:
    """The other commit's value, the ratio to it, and the ratio bar (judged if there was an
    --against run)."""
    other = m.get("against")
    bar = m.get("ratio_bar")
    goal = f"{_OPS[bar['op']]} {fmt(bar['value'])}×" if bar else ""
    if other is None:
        return "", "", goal
    value = f"{other['commit'][:7]}: {fmt(other['value'])} {m['unit']}"
    times = "" if other["ratio"] is None else f"{fmt(other['ratio'])}×"
    if bar and other["met"] is not None:
        goal += " — yes" if other["met"] else " — **no**"
    return value, times, goal


def report(m: dict[str, Any]) -> str:
    """A metric as one printed line: its value, met or not, and against another commit."""
    line = f"   {m['name']}: {fmt(m['value'])} {m['unit']}"
    line += "" if m["met"] is None else ("  [met]" if m["met"] else "  [NOT MET]")
    other = m.get("against")
    if other is not None:
        line += f"  | {other['commit'][:7]}: {fmt(other['value'])} {m['unit']}"
        if other["ratio"] is not None:
            line += f", ratio {fmt(other['ratio'])}×"
        bar = m.get("ratio_bar")
        if bar is not None:
            line += f" (bar {_OPS[bar['op']]} {fmt(bar['value'])}×)"
            line += "" if other["met"] is None else ("  [met]" if other["met"] else "  [NOT MET]")
    return line


def write_table(results: Path = RESULTS) -> Path:
    found = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    path = results / "README.md"
    path.write_text(table(found))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="name", help=f"any of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="short smoke-test runs")
    parser.add_argument(
        "--estimate", action="store_true", help="say how long each would take, and run none"
    )
    parser.add_argument(
        "--against",
        metavar="COMMIT",
        help="also run each benchmark in a checkout of COMMIT, alternately, and report the ratios",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help=f"rounds of an --against run (default {ROUNDS}, --quick {QUICK_ROUNDS})",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    if args.rounds is not None and (args.against is None or args.rounds < 1):
        parser.error("--rounds: a number of rounds ≥ 1, with --against")
    rounds = (args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)) if args.against else 0
    commit = None
    if args.against:
        try:
            commit = against.resolve(args.against)
        except against.AgainstError as exc:
            parser.error(str(exc))
    names = args.names or list(BENCHMARKS)
    seconds = {n: estimate(args.results, n, args.quick, rounds) for n in names}
    if args.estimate:
        for name, took in seconds.items():
            print(f"{name}: about {duration(took)}")
    mode = "quick runs" if args.quick else "full runs"
    if commit:
        mode += f", {rounds} round(s) each here and at {commit[:12]}"
    print(f"{len(names)} benchmark(s), {mode}: about {duration(sum(seconds.values()))}", flush=True)
    if args.estimate:
        return 0
    other = None
    if commit:
        try:
            other = against.checkout(commit)
            missing = against.unknown_there(other, names)
        except against.AgainstError as exc:
            parser.error(str(exc))
        if missing:
            parser.error(
                f"{commit[:12]} does not have {', '.join(missing)}: run those without --against"
            )
    failed = []
    # A bar on a terminal (what the benchmarks print goes above it), plain lines otherwise.
    with Progress(Console()) as progress:
        finished = progress.task("benchmarks", total=len(names))
        quick = " (quick)" if args.quick else ""
        for i, name in enumerate(names, start=1):
            about = f"about {duration(seconds[name])} ({i}/{len(names)})"
            print(f"== {name}{quick}, {about}", flush=True)
            try:
                if commit is None or other is None:
                    result = run_one(name, args.quick, args.results)
                else:
                    result = against.run(name, args.quick, rounds, commit, other)
                    path = result_path(args.results, name, args.quick)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            except Exception:
                # One broken benchmark does not cost the others' results.
                traceback.print_exc()
                failed.append(name)
            else:
                print(f"   took {duration(result['seconds'])}")
                for m in result["metrics"]:
                    print(report(m))
            finished.advance()
    if not args.quick:
        print(f"table: {write_table(args.results)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    # Targets are reported, not enforced: a missed target is a finding, not a crash.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
