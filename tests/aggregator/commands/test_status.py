"""`meterline status`: one screen of what runs, and an exit status an operator can script.

What it concludes from what the cores say is held to every problem it names on made-up
clusters (no process); against the session's embedded server (`server`), and one of its own
with a metrics token and scheduled snapshots, it shows what runs and exits 0, or says in one
line why it cannot run and exits 2. Kafka mode, a kill and a restart are in the takeover test
(`tests/aggregator/intake/test_takeover.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from aggregator.commands.status import Core, Figures, problems, report
from tests.inprocess import ServedCore, run_cli
from tests.processes import Server, free_port

NOW = 1_800_000_000.0
OK = Figures(lag=0, health="ok", data_bytes=10**6, free_bytes=50 * 10**9, disk_bytes=10**11)


def _core(
    name: str, role: str, *, alive: bool = True, ago: float = 1.0, shard: str = "0/1"
) -> Core:
    return Core(name, f"http://{name}:8000", role, shard, 3, NOW - ago, alive, this=False)


def _problems(cores: list[Core], figures: dict[str, Figures] | None = None) -> list[str]:
    found = {c.id: OK for c in cores if c.alive} | (figures or {})
    return problems(cores, found, NOW, max_lag=1000)


def test_a_healthy_cluster_has_no_problem_and_fits_a_screen() -> None:
    cores = [_core("a", "leader"), _core("b", "standby"), _core("c", "replica")]
    assert _problems(cores) == []
    shown = report("http://edge:8001", cores, {c.id: OK for c in cores}, NOW, 1000)
    assert shown[0] == "meterline at http://edge:8001: Kafka mode, 3 cores"
    assert shown[1].split() == [
        *("CORE", "ROLE", "ALIVE", "HEARD", "EPOCH", "LAG", "HEALTH"),
        *("SNAPSHOT", "DATA", "DISK", "FREE"),
    ]
    assert shown[2].split() == [
        *("http://a:8000", "leader", "yes", "1.0", "s", "3", "0", "ok"),
        *("none", "1.0", "MB", "50.0", "GB", "(50%)"),
    ]
    assert shown[-1] == "all well" and len(shown) == 6
    assert max(len(line) for line in shown) <= 100


def test_every_problem_is_named_once() -> None:
    leader, standby = _core("a", "leader"), _core("b", "standby")
    # Killed, not yet replaced: not heard, and no leader (a standby takes over soon).
    dead = replace(leader, role="standby", alive=False, heard_at=NOW - 40)
    assert _problems([dead, standby]) == [
        "http://a:8000 (standby) not heard for 40 s",
        "no core leads shard 0/1 (a standby takes over once the leader's session times out;"
        " replicas never lead)",
    ]
    # Stopped, or restarted (its URL served again by a live core): not a problem.
    assert _problems([leader, replace(standby, role="stopped", alive=False)]) == []
    restarted = _core("a2", "standby", alive=False, ago=90)
    assert _problems([leader, standby, replace(restarted, url=leader.url)]) == []
    # Each figure beyond its bound.
    b = "http://b:8000 (standby)"
    cases = {
        f"{b} is 1,001 behind (more than --max-lag 1,000)": replace(OK, lag=1001),
        f"{b} is degraded: its disk: full": replace(OK, health="degraded", why="its disk: full"),
        f"{b}: its data dir's disk is 4.0 GB free (4%)": replace(OK, free_bytes=4 * 10**9),
        f"{b}: its last snapshot failed 60 s ago (its log says why)": replace(
            OK, snapshot_at=NOW - 3600, snapshot_failed_at=NOW - 60
        ),
        f"{b}: no snapshot for 3 h (--backup-every-seconds 3600)": replace(
            OK, snapshot_at=NOW - 3 * 3600, snapshot_every=3600
        ),
        f"{b}: http://b:8000/metrics not reached (refused)": Figures(
            unread="http://b:8000/metrics not reached (refused)"
        ),
        f"{b}: how far behind it is could not be read from its /metrics": replace(OK, lag=None),
    }
    for said, figures in cases.items():
        assert _problems([leader, standby], {"b": figures}) == [said]
    # Within the bounds: a snapshot due, not yet late; the lag at the bound.
    fine = replace(OK, lag=1000, snapshot_at=NOW - 5000, snapshot_every=3600)
    assert _problems([leader, standby], {"b": fine}) == []


def test_each_shard_needs_a_leader() -> None:
    cores = [
        _core("a", "leader"),
        _core("b", "replica", shard="1/2"),
        _core("c", "leader", shard="1/2", alive=False),
    ]
    assert _problems(cores)[-1].startswith("no core leads shard 1/2")
    shown = report("http://a:8000", cores, {}, NOW, 1000)
    assert shown[0].endswith("3 cores in 2 shards") and "SHARD" in shown[1]


def test_the_embedded_pipeline_is_one_core_that_is_well(server: Server) -> None:
    done = run_cli("status", "--url", server.url, "--token", str(server.token))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"meterline at {server.url}: embedded, 1 core"
    row = lines[2].split()
    assert row[:2] == [server.url, "embedded"] and row[2] == "yes" and "ok" in row
    assert lines[-1] == "all well" and done.stderr == ""


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--token", "mlt_oat_not_a_token"), "refused the token (HTTP 401)"),
        (("--url", f"http://127.0.0.1:{free_port()}", "--token", "x"), "cannot reach"),
    ],
)
def test_what_keeps_it_from_running_is_one_line_and_exit_2(
    server: Server, args: tuple[str, ...], said: str
) -> None:
    done = run_cli("status", "--url", server.url, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr


def test_no_token_says_where_one_comes_from(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METERLINE_TOKEN", raising=False)
    done = run_cli("status", "--url", server.url)
    assert done.returncode == 2
    assert "meterline token create" in done.stderr and done.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedCore]:
    """An embedded server whose /metrics needs a token, taking a snapshot at start."""
    root = tmp_path_factory.mktemp("status")
    args = ("--metrics-token", "figures", "--backup-to", str(root / "snapshots"))
    with ServedCore(root / "data", *args) as running:
        yield running


def test_a_metrics_token_and_scheduled_snapshots(guarded: ServedCore, tmp_path: Path) -> None:
    asked = ("status", "--url", guarded.url, "--token", str(guarded.token))
    refused = run_cli(*asked)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--metrics-token" in refused.stderr and "HTTP 401" in refused.stderr
    done = run_cli(*asked, "--metrics-token", "figures")
    assert done.returncode == 0, done.stdout
    # The schedule's first snapshot is taken at start.
    assert " ago " in done.stdout.splitlines()[2], done.stdout
