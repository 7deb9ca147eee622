"""A command imports what it runs: `meterline --help`, every subcommand's `--help` and a token
made in a data dir load none of the server's heavy parts (DuckDB, Arrow, the HTTP server, Kafka's
client, the API), so that they answer at once. Checked on what a fresh interpreter imported, not
on a clock (`benchmarks/startup.py` measures the time)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from aggregator import cli

pytestmark = pytest.mark.processes  # a fresh interpreter is what is measured

# Third-party packages and the project's own packages that only a running server needs.
HEAVY = (
    "duckdb",
    "pyarrow",
    "numpy",
    "starlette",
    "uvicorn",
    "uvloop",
    "aiokafka",
    "httpx",
    "pydantic",
    "msgspec",
    "rich",
    "cryptography",
    "aggregator.store",
    "aggregator.api",
    "aggregator.intake",
    "aggregator.services",
    "aggregator.core_app",
    "ingest.http",
    "meters.events",
)
# Runs `cli.main` on each command line given (argv lists, as JSON), then prints what was imported.
_PROBE = """
import contextlib, io, json, sys
from aggregator import cli
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
    assert code in (0, None), (argv, code)
print(json.dumps({"modules": sorted(sys.modules), "out": out.getvalue()}))
"""


def _imported(*argvs: list[str]) -> tuple[set[str], str]:
    """The modules a new interpreter imported running these command lines in turn, and what the
    last one printed."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, orjson.dumps(argvs).decode()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = orjson.loads(done.stdout)
    return set(answer["modules"]), answer["out"]


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def _commands(parser: argparse.ArgumentParser, words: list[str]) -> list[list[str]]:
    """Every command line that names a (sub)command, `[]` for `meterline` itself."""
    found = [words]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, [*words, name])
    return found


def test_every_help_imports_none_of_the_servers_parts() -> None:
    commands = _commands(cli._parser(), [])
    assert len(commands) > 25  # up, core, ingest, token create, …
    modules, out = _imported(*([*words, "--help"] for words in commands))
    assert "usage: meterline split" in out  # the last one ran
    assert _heavy(modules) == []


def test_a_token_made_in_a_data_dir_imports_none_of_the_servers_parts(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    made = ["token", "create", "--org", "acme", "--data-dir", data_dir]
    modules, out = _imported([*made, "--init"], made, ["token", "list", "--data-dir", data_dir])
    assert out.count("acme") == 2  # both tokens, listed
    assert _heavy(modules) == []
