"""The `meterline` command as its users meet it: help that names every option's default, the
environment variables, errors that name what was tried, token commands that refuse a data dir
without meterline data, the development token only on loopback, a locked data dir, a damaged
write-ahead log, waiting for a backfill (in events), and reconcile's date words, warnings,
report path and fast failure.

Most run `aggregator.cli.main` in this process against the session's real server (`server`)."""

from __future__ import annotations

import argparse
import asyncio
import io
import shlex
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from rich.console import Console

from aggregator import cli
from aggregator.auth import TokenRegistry
from aggregator.commands.common import HelpFormatter
from aggregator.commands.progress import Progress
from aggregator.commands.tokens import banner_lines, create_command
from aggregator.settings import CoreSettings
from aggregator.store import Store
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.engine.migrations import migrate
from aggregator.store.tables.meter_tables import backfill_step_job
from ingest.kafka import KafkaSettings
from tests.deadline import seconds_left
from tests.inprocess import ServedCore
from tests.processes import MeterlineServer, Server, free_port, new_org_token

EVERYTHING = {"conjunction": "and", "clauses": []}


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_every_option_has_help_naming_its_default_and_no_token_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = f"mlt_oat_{uuid.uuid4().hex}"
    for name in ("METERLINE_TOKEN", "METERLINE_UPSTREAM_TOKEN", "METERLINE_METRICS_TOKEN"):
        monkeypatch.setenv(name, secret)
    parsers = _parsers(cli._parser())
    assert len(parsers) > 10
    for parser in parsers:
        assert secret not in parser.format_help(), parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog} {action.dest}: no help"
            shown = HelpFormatter(parser.prog)._get_help_string(action)
            if action.default is not None and action.default is not False:
                assert "default:" in shown, f"{parser.prog} {action.dest}: {shown}"


@pytest.mark.processes
def test_the_installed_command_prints_its_version() -> None:
    # What the README documents: the console script installed into the venv.
    script = Path(sys.executable).parent / "meterline"
    done = subprocess.run(
        [str(script), "--version"],
        capture_output=True,
        text=True,
        timeout=seconds_left(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"meterline {metadata.version('meterline')}"


def test_token_commands_refuse_a_dir_without_meterline_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = tmp_path / "typo"
    monkeypatch.setenv("METERLINE_DATA_DIR", str(fresh))  # what --data-dir defaults to
    for args in (["token", "create", "--org", "acme"], ["token", "list"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert str(fresh) in err and f"up --data-dir {fresh}" in err and "--init" in err
    assert not fresh.exists()  # no new secret, nor the directory

    assert cli.main(["token", "create", "--org", "acme", "--init"]) == 0
    token = capsys.readouterr().out.strip()
    registry = TokenRegistry(fresh)
    try:
        found = registry.authenticate(token)
        assert found is not None and found.name == "acme"
    finally:
        registry.close()
    assert cli.main(["token", "list"]) == 0
    assert "acme" in capsys.readouterr().out


def test_the_development_token_only_on_loopback_and_hints_are_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = TokenRegistry(tmp_path)
    try:
        public = CoreSettings(data_dir=tmp_path, host="0.0.0.0")
        (line,) = banner_lines(registry, public, None)
        assert "not a loopback address" in line and "mlt_oat_" not in line
        assert registry.list_tokens() == []  # none created either
        (line,) = banner_lines(registry, CoreSettings(data_dir=tmp_path), False)
        assert "--no-dev-token" in line and registry.list_tokens() == []

        loopback = CoreSettings(data_dir=tmp_path, host="::1")
        token = banner_lines(registry, loopback, None)[0].split()[-1]
        assert token.startswith("mlt_oat_dev_")
        assert banner_lines(registry, public, True)[0].split()[-1] == token  # --dev-token
        # Not printed, but said to be alive.
        hint, warning = banner_lines(registry, public, None)
        assert "still works" in warning and token not in warning

        registry.revoke(registry.list_tokens()[0].id)
        (revoked,) = banner_lines(registry, loopback, None)
    finally:
        registry.close()
    assert "revoked" in revoked
    for said in (hint, revoked):  # the hint runs as printed
        command = shlex.split(said.split("create a token with: ")[1])
        assert command[0] == "meterline"
        assert cli.main(command[1:]) == 0
        assert capsys.readouterr().out.startswith("mlt_oat_")


@pytest.mark.processes
def test_a_second_server_on_a_locked_data_dir_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The lock is another process's (DuckDB shares one open file within a process).
    with MeterlineServer(tmp_path) as server:
        args = ["up", "--data-dir", str(server.data_dir), "--port", str(free_port())]
        assert cli.main([*args, "--log-level", "warning", "--validation-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(server.data_dir) in err and f"process {server.pid}" in err
    assert "Traceback" not in err


def test_a_port_in_use_exits_2_with_the_option_to_change_and_makes_no_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (["up"], ["core", "--kafka", "127.0.0.1:1"]):
            data_dir = tmp_path / command[0]
            assert cli.main([*command, "--data-dir", str(data_dir), "--port", str(port)]) == 2
            err = capsys.readouterr().err
            assert f"port {port} on 127.0.0.1 is in use" in err and "--port" in err, err
            assert f"make up PORT={port + 1}" in err and "Traceback" not in err
            assert not data_dir.exists()


def test_core_says_how_to_make_a_token_for_its_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = CoreSettings(data_dir=tmp_path / "my data")
    create = create_command(settings, None)
    assert create == f"meterline token create --data-dir '{tmp_path}/my data' --org default"
    kafka = create_command(settings, KafkaSettings("broker:9092", topic="usage"))
    assert kafka.endswith("--org default --kafka broker:9092 --topic usage")
    # The banner a core prints (`up` prints the development token instead).
    with ServedCore(tmp_path / "core", dev_token=False) as core:
        pass
    said = capsys.readouterr().out
    assert f"a token: {create_command(CoreSettings(data_dir=core.data_dir), None)}" in said


@pytest.mark.processes
def test_a_damaged_write_ahead_log_says_so_in_one_line(tmp_path: Path) -> None:
    """`meterline up` on a data dir whose DuckDB WAL is damaged (garbage written over the middle
    of its one large entry, which DuckDB's checksum catches) exits 2 with one line naming the
    file and what to do, not a traceback."""
    database = tmp_path / "meterline.duckdb"
    con = duckdb.connect(str(database))
    migrate(con)
    con.execute("CHECKPOINT")
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    con.execute("CREATE TABLE filler AS SELECT repeat('x', 100000) AS text")
    con.close()
    wal = tmp_path / "meterline.duckdb.wal"
    damaged = bytearray(wal.read_bytes())
    middle = len(damaged) // 2
    # 64 distinct bytes: DuckDB's entry checksum XORs the hashes of 8-byte words, so eight equal
    # words laid over eight equal words ('x' * 8) at a word boundary cancel out and pass (one
    # placement in eight: the entry's offset moves with the ids in it).
    damaged[middle : middle + 64] = bytes(range(1, 65))
    wal.write_bytes(damaged)
    args = ["up", "--data-dir", str(tmp_path), "--port", str(free_port()), "--log-level", "warning"]
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", *args, "--validation-workers", "0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds_left(),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(wal) in done.stderr and "backup" in done.stderr and "aside" in done.stderr


def test_an_unreachable_url_is_named_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("METERLINE_URL", closed)
    monkeypatch.setenv("METERLINE_TOKEN", "mlt_oat_whatever")
    for args in (["forwarder", "status"], ["meters", "wait"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert closed in err and "`meterline up` running" in err and "--url" in err
    monkeypatch.delenv("METERLINE_TOKEN")
    assert cli.main(["forwarder", "status"]) == 2
    assert "METERLINE_TOKEN" in capsys.readouterr().err


def test_meters_wait_shows_the_backfill_in_events(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    token = new_org_token(server.data_dir, f"wait-{uuid.uuid4().hex}")
    other = new_org_token(server.data_dir, f"other-{uuid.uuid4().hex}")
    with server.client(token) as mine, server.client(other) as theirs:
        for client, n in ((mine, 30), (theirs, 50)):  # the other's raise the seq past 30
            events = [{"name": "use", "external_customer_id": "c"} for _ in range(n)]
            assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
        meter = {"name": "uses", "filter": EVERYTHING, "aggregation": {"func": "count"}}
        created = mine.post("/v1/meters/", json=meter).json()
        wait = ["meters", "wait", created["id"], "--url", server.url, "--token", token]
        assert cli.main([*wait, "--poll-seconds", "0.1"]) == 0
        assert mine.get(f"/v1/meters/{created['id']}").json()["backfill"] == {
            "status": "done",
            "events_done": 30,
            "events_total": 30,
        }
        err = capsys.readouterr().err
        assert "backfill of uses: 30 of 30 (100%)" in err and "backfill done: 1 meter\n" in err
        # No id: every meter of the organization; an unknown one is named.
        assert cli.main(["meters", "wait", "--url", server.url, "--token", token]) == 0
        missing = str(uuid.uuid4())
        assert cli.main(["meters", "wait", missing, "--url", server.url, "--token", token]) == 2
        assert f"no meter {missing}" in capsys.readouterr().err


def test_reconcile_takes_date_words_warns_and_says_where_the_report_went(
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The same server is both sides, as two organizations: the upstream one has no meter and
    # none of the local event.
    local = new_org_token(server.data_dir, f"local-{uuid.uuid4().hex}")
    upstream = new_org_token(server.data_dir, f"upstream-{uuid.uuid4().hex}")
    with server.client(local) as client:
        meter = {"name": "only here", "filter": EVERYTHING, "aggregation": {"func": "count"}}
        assert client.post("/v1/meters/", json=meter).status_code == 201
        event = {"name": "use", "external_customer_id": "c", "external_id": "one"}
        assert client.post("/v1/events/ingest", json={"events": [event]}).status_code == 200
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METERLINE_URL", server.url)
    monkeypatch.setenv("METERLINE_TOKEN", local)
    window = ["reconcile", "--from", "today", "--to", "now", "--upstream-url", server.url]
    assert cli.main([*window, "--upstream-token", upstream]) == 1
    err = capsys.readouterr().err
    assert "1 meter not upstream (by name), so not compared: only here" in err
    assert "missing upstream: 1 event; upstream only: 0 events;" in err
    report = tmp_path / "reconcile-report.json"
    assert f"report written to {report}" in err.replace("\n", "")
    assert orjson.loads(report.read_bytes())["meters_missing_upstream"] == ["only here"]

    # An upstream that is not there fails at once, naming it.
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert cli.main([*window[:5], "--upstream-url", closed, "--upstream-token", "x"]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert closed in err and "--upstream-url" in err


def test_reconcile_window_words() -> None:
    parse = cli._parser().parse_args
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    common = ["--upstream-url", "u"]
    args = parse(["reconcile", "--from", "yesterday", "--to", "today", *common])
    assert (args.start, args.end) == (today - timedelta(days=1), today)
    args = parse(
        ["reconcile", "--from", "2026-11-01", "--to", "2026-11-02T06:00:00+05:30", *common]
    )
    assert args.start == datetime(2026, 11, 1, tzinfo=UTC)
    assert args.end == datetime(2026, 11, 2, 0, 30, tzinfo=UTC)
    with pytest.raises(SystemExit) as exited:
        parse(["reconcile", "--from", "last week", "--to", "today", *common])
    assert exited.value.code == 2


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("uptime", [0.0, 300.0, 10.0**6])
def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(terminal: bool, uptime: float) -> None:
    """Whatever the clock reads at the start: a monotonic clock counts from the machine's boot,
    and CI's machines may have booted a minute ago."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=100)
    with Progress(console, every_seconds=3600, clock=lambda: uptime) as progress:
        task = progress.task("local events")
        task.update(total=2500)
        for _ in range(25):
            task.advance(100)
    shown = out.getvalue()
    if terminal:
        assert "━" in shown and "2500/2500" in shown
    else:  # the first state, then the end: not a line per advance
        assert shown == "local events: 0 of 2,500 (0%)\nlocal events: 2,500 of 2,500 (100%)\n"


def test_a_data_dir_from_before_event_counts_shows_backfill_in_events(tmp_path: Path) -> None:
    """Schema step 18 (meters' progress in seq positions only): two organizations' events
    interleaved, a meter done and one halfway. They read as event counts, and the halfway one
    counts on to its total."""
    path = tmp_path / "meterline.duckdb"
    org, other = str(uuid.uuid4()), str(uuid.uuid4())
    done, halfway = str(uuid.uuid4()), str(uuid.uuid4())
    con = duckdb.connect(str(path))
    assert migrate(con, until=18) == 18
    con.execute(
        "INSERT INTO events (seq, organization_id, name, timestamp, ingested_at,"
        " external_customer_id, metadata) SELECT i, CASE WHEN i % 3 = 0 THEN ? ELSE ? END::UUID,"
        " 'use', now(), now(), 'c', '{}' FROM range(1, 31) t(i)",
        [other, org],
    )
    for meter_id, backfilled_to in ((done, 30), (halfway, 15)):
        con.execute(
            "INSERT INTO meters (id, organization_id, name, unit, filter, aggregation, metadata,"
            " created_at, backfill_target, backfilled_to)"
            " VALUES (?, ?, 'uses', 'scalar', ?, '{\"func\": \"count\"}', '{}', now(), 30, ?)",
            [meter_id, org, orjson.dumps(EVERYTHING).decode(), backfilled_to],
        )
    con.close()

    async def run() -> list[tuple[int, int]]:
        async with Store(path) as store:

            async def progress(meter_id: str) -> tuple[int, int]:
                row: Any = await store.read(get_meter, org, meter_id)
                return row.backfilled_events, row.backfill_events

            seen = [await progress(done), await progress(halfway)]
            while await store.write(backfill_step_job(halfway, 1, 4)) != (30, 30):
                pass
            return [*seen, await progress(halfway)]

    # Org's events: seq 1..30 but those divisible by 3, 20; up to seq 15, 10.
    assert asyncio.run(run()) == [(20, 20), (10, 20), (20, 20)]
