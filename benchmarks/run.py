"""Run benchmarks, store each result as JSON and regenerate the results table.

    python -m benchmarks.run [names...] [--quick]

Each benchmark is a function `run(quick) -> {"metrics": [...], "details": {...}}` registered in
BENCHMARKS; its module docstring states the hypothesis and the command. Results go to
benchmarks/results/<name>.json, and benchmarks/results/README.md is rebuilt from every JSON file
there (so results of benchmarks not rerun stay in the table). `--quick` results go to
benchmarks/results/quick/ (not committed) and leave the table alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import (
    alerts,
    core,
    forwarding,
    ingest_http,
    isolation,
    kafka,
    ledger,
    meters,
    sdk,
    validation,
)

RESULTS = Path(__file__).parent / "results"
# A module (its `run`) or a function; the hypothesis is the function's docstring, else its
# module's.
BENCHMARKS: dict[str, ModuleType | Callable[[bool], dict[str, Any]]] = {
    "validation": validation,
    "ingest_http": ingest_http,
    "ingest_http_inline": ingest_http.inline,
    "ingest_http_meters": meters.ingest_http_meters,
    "rollup_update": meters.rollup_update,
    "core_apply": core,
    "quantities_1m": meters.quantities_1m,
    "quantities_10m": meters.quantities_10m,
    "kafka_ingest_http": kafka.kafka_ingest_http,
    "kafka_consume": kafka.kafka_consume,
    "kafka_freshness": kafka.kafka_freshness,
    "balance_check": ledger.balance_check,
    "alert_latency": alerts.alert_latency,
    "ledger_cost": ledger.ledger_cost,
    "forward_throughput": forwarding.forward_throughput,
    "reconcile_1m": forwarding.reconcile_1m,
    "sdk_record": sdk.sdk_record,
    "sdk_deliver": sdk.sdk_deliver,
    "isolation": isolation,
}
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


def run_one(name: str, quick: bool) -> dict[str, Any]:
    entry = BENCHMARKS[name]
    bench: Callable[[bool], dict[str, Any]] = entry.run if isinstance(entry, ModuleType) else entry
    doc = (bench.__doc__ or sys.modules[bench.__module__].__doc__ or "").strip()
    result = {
        "benchmark": name,
        "summary": doc.splitlines()[0] if doc else "",
        "mode": "quick" if quick else "full",
        "machine": machine(),
        **bench(quick),
    }
    # A quick run is a smoke test: it never replaces a full run's results or enters the table.
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
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
        "| benchmark | metric | value | target | met? |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in results:
        name = result["benchmark"] + (" (quick)" if result.get("mode") == "quick" else "")
        for m in result["metrics"]:
            target = m["target"]
            goal = f"{_OPS[target['op']]} {fmt(target['value'])} {m['unit']}" if target else ""
            met = "" if m["met"] is None else ("yes" if m["met"] else "**no**")
            lines.append(
                f"| {name} | {m['name']} | {fmt(m['value'])} {m['unit']} | {goal} | {met} |"
            )
    lines += ["", "## Runs", ""]
    for result in results:
        mach = result["machine"]
        commit = (mach.get("git_commit") or "unknown")[:12] + (
            " (dirty)" if mach.get("git_dirty") else ""
        )
        lines.append(
            f"- **{result['benchmark']}** ({result.get('mode', 'full')}): {mach['date']},"
            f" commit {commit}, {mach['cpus_usable']} CPUs ({mach['cpu_model']}),"
            f" load {mach['load_average_at_start']}, Python {mach['python']},"
            f" DuckDB {mach['duckdb']}"
        )
    return "\n".join(lines) + "\n"


def write_table() -> Path:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    path = RESULTS / "README.md"
    path.write_text(table(results))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="name", help=f"any of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="short smoke-test runs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        result = run_one(name, args.quick)
        for m in result["metrics"]:
            print(
                f"   {m['name']}: {fmt(m['value'])} {m['unit']}"
                + ("" if m["met"] is None else ("  [met]" if m["met"] else "  [NOT MET]"))
            )
    if not args.quick:
        print(f"table: {write_table()}")
    # Targets are reported, not enforced: a missed target is a finding, not a crash.
    return 0


if __name__ == "__main__":
    sys.exit(main())
