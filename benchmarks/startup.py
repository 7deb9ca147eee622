"""Processes that start fast: a command imports only what it runs.

Hypothesis: `meterline --help` and every subcommand's `--help` take at most 5x `python -c pass`
(the interpreter's own start, the reference measured in the same run); `meterline token create`
on a data dir takes at most 1 s; `meterline up`, and `meterline core` and `meterline ingest`
against a broker, answer `/healthz` with a 200 as soon as they can serve (reported in seconds
and against the reference).

Command: `.venv/bin/python -m benchmarks.run startup` (`--quick`: fewer rounds and runs).

Every command is the installed console script (`.venv/bin/meterline`), run as a user runs it;
the reference is the same interpreter's `python -c pass`. In each round, the reference, every
`--help` (`meterline --help` and each subcommand's, found by walking the parser) and a `token
create` on a data dir made once by `token create --init` run one after another, so that the
machine's load drifts over all of them alike: medians over the rounds. Then, in each of a few
runs: `meterline up` on a fresh data dir, and against a fresh Tansu broker (memory storage,
`--no-idempotence`) `meterline core` on a fresh data dir and `meterline ingest` on the core's
(its cluster secret), each timed from its exec until its `/healthz` first answers 200 (asked
every 10 ms), then stopped with SIGTERM. Defaults otherwise (validation workers: one per CPU).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aggregator import cli
from benchmarks.common import metric
from tests.processes import Broker, free_port

METERLINE = str(Path(sys.executable).parent / "meterline")
HELP_RATIO = 5.0  # at most, each --help over `python -c pass`
TOKEN_SECONDS = 1.0  # at most, `token create` on a data dir
START_LIMIT_SECONDS = 120.0  # a process not serving by then fails the run


def _commands(parser: argparse.ArgumentParser, words: list[str]) -> list[list[str]]:
    """Every command line naming a (sub)command: `[]` for `meterline` itself."""
    found = [words]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, [*words, name])
    return found


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def _serves(port: int) -> bool:
    """Whether `/healthz` answers 200 (a raw request: the poll costs the machine little)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return sock.recv(32).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class _Started:
    """A `meterline` server process, timed from its exec to its first 200 on `/healthz`."""

    def __init__(self, *args: str, data_dir: Path, log: Path) -> None:
        port = free_port()
        self._log = log.open("wb")
        started = time.perf_counter()
        self._proc = subprocess.Popen(
            [METERLINE, *args, "--port", str(port), "--data-dir", str(data_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        while not _serves(port):
            if self._proc.poll() is not None or time.perf_counter() - started > START_LIMIT_SECONDS:
                self.stop()
                raise RuntimeError(f"meterline {args[0]} did not serve: {log.read_text()[-2000:]}")
            time.sleep(0.01)
        self.seconds = time.perf_counter() - started

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()


def _servers(work: Path) -> dict[str, float]:
    """One run of each server: seconds from exec to its first 200 on `/healthz`."""
    work.mkdir(parents=True)
    up = _Started("up", data_dir=work / "up", log=work / "up.log")
    up.stop()
    with Broker() as broker:
        kafka = ("--kafka", broker.bootstrap, "--no-idempotence")
        core = _Started("core", *kafka, data_dir=work / "core", log=work / "core.log")
        try:
            edge = _Started("ingest", *kafka, data_dir=work / "core", log=work / "edge.log")
            edge.stop()
        finally:
            core.stop()
    return {"up": up.seconds, "core": core.seconds, "ingest": edge.seconds}


def run(quick: bool = False) -> dict[str, Any]:
    rounds, runs = (3, 1) if quick else (15, 5)
    work = Path(tempfile.mkdtemp(prefix="meterline-startup-"))
    try:
        data_dir = work / "tokens"
        made = [METERLINE, "token", "create", "--org", "acme", "--data-dir", str(data_dir)]
        subprocess.run([*made, "--init"], stdout=subprocess.DEVNULL, check=True)
        helps = {
            " ".join(["meterline", *w, "--help"]): [METERLINE, *w, "--help"]
            for w in _commands(cli._parser(), [])
        }
        timed: dict[str, list[float]] = {"python -c pass": [], **{h: [] for h in helps}}
        timed["token create"] = []
        for _ in range(rounds):
            timed["python -c pass"].append(_seconds([sys.executable, "-c", "pass"]))
            for name, command in helps.items():
                timed[name].append(_seconds(command))
            timed["token create"].append(_seconds(made))
        median = {name: statistics.median(values) for name, values in timed.items()}
        reference = median["python -c pass"]
        ratios = {name: median[name] / reference for name in helps}
        slowest = max((n for n in helps if n != "meterline --help"), key=ratios.__getitem__)
        print(
            f"   python -c pass {reference * 1000:.0f} ms; meterline --help"
            f" {ratios['meterline --help']:.1f}x; slowest: {slowest} {ratios[slowest]:.1f}x;"
            f" token create {median['token create']:.2f} s",
            flush=True,
        )
        served: dict[str, list[float]] = {"up": [], "core": [], "ingest": []}
        for i in range(runs):
            for name, seconds in _servers(work / f"run{i}").items():
                served[name].append(seconds)
            print(f"   run {i + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in served.items()))
        serving = {name: statistics.median(values) for name, values in served.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = [
        metric("python -c pass (reference)", reference, "s"),
        metric(
            "meterline --help / python -c pass", ratios["meterline --help"], "x", "<=", HELP_RATIO
        ),
        metric(
            "slowest subcommand --help / python -c pass", ratios[slowest], "x", "<=", HELP_RATIO
        ),
        metric("meterline --help", median["meterline --help"], "s"),
        metric("token create on a data dir", median["token create"], "s", "<=", TOKEN_SECONDS),
        metric("token create / python -c pass", median["token create"] / reference, "x"),
    ]
    for name, what in (
        ("up", "up (embedded)"),
        ("core", "core --kafka"),
        ("ingest", "ingest --kafka"),
    ):
        metrics += [
            metric(f"{what}: exec to /healthz 200 (median)", serving[name], "s"),
            metric(
                f"{what}: exec to /healthz 200 / python -c pass", serving[name] / reference, "x"
            ),
        ]
    return {
        "metrics": metrics,
        "details": {
            "rounds": rounds,
            "server_runs": runs,
            "slowest_help": slowest,
            "median_seconds": {name: round(value, 4) for name, value in median.items()},
            "help_ratios": {name: round(value, 2) for name, value in ratios.items()},
            "server_seconds": {
                name: [round(s, 3) for s in values] for name, values in served.items()
            },
        },
    }
