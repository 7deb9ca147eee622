"""deploy/meterline-reconcile.cron as cron runs it: its job line in `sh -c`, with the file's
variables and cron's minimal PATH, on a fresh install (the reports folder does not exist). Only
the install's places move into a temporary folder, through the variables the file sets: the
prefix holds the repository's deploy/ and this venv, as /opt/meterline would. The local server
forwards to a second meterline, the upstream."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.deadline import seconds_left, wait_for
from tests.faults import forwarded, forwarding
from tests.processes import Server, free_port

pytestmark = pytest.mark.processes
DEPLOY = Path(__file__).parents[2] / "deploy"
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
EVENTS = 12


def crontab() -> tuple[dict[str, str], str, str]:
    """The file's variables, and its one job's user and command."""
    variables, jobs = {}, []
    for line in (DEPLOY / "meterline-reconcile.cron").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if found := ASSIGNMENT.match(line):
            variables[found[1]] = found[2]
        else:
            jobs.append(line.split(maxsplit=6))  # minute hour day month weekday user command
    assert len(jobs) == 1 and len(jobs[0]) == 7, jobs
    return variables, jobs[0][5], jobs[0][6]


class Install:
    """The cron job's places, moved under `root`."""

    def __init__(self, root: Path, local: Server, upstream: Server) -> None:
        prefix = root / "opt" / "meterline"
        prefix.mkdir(parents=True)
        (prefix / "deploy").symlink_to(DEPLOY)
        (prefix / "venv").symlink_to(sys.prefix)
        self.env_file = root / "etc" / "meterline" / "reconcile.env"
        self.env_file.parent.mkdir(parents=True)
        self.env_file.write_text(
            f"METERLINE_TOKEN={local.token}\n"
            f"METERLINE_UPSTREAM_TOKEN={upstream.token}\n"
            f"UPSTREAM_URL={upstream.url}\n"
            f"METERLINE_URL={local.url}\n"
        )
        self.env_file.chmod(0o600)
        self.reports = root / "var" / "lib" / "meterline" / "reconcile"
        self.places = {
            "METERLINE_PREFIX": str(prefix),
            "METERLINE_RECONCILE_ENV": str(self.env_file),
            "METERLINE_REPORTS": str(self.reports),
        }

    def run_job(self) -> subprocess.CompletedProcess[str]:
        variables, user, command = crontab()
        assert user == "meterline"
        assert self.places.keys() <= variables.keys()  # every place the test moves is the file's
        # cron's own environment: a short PATH, HOME and the user's names, then the file's.
        env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": str(self.reports.parent)}
        env |= {"LOGNAME": user, "USER": user, **variables, **self.places}
        return subprocess.run(
            ["/bin/sh", "-c", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds_left(),
        )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """A local meterline holding yesterday's events, all forwarded to the upstream."""
    root = tmp_path_factory.mktemp("cron")
    with forwarding(root, []) as (upstream, _, local):
        noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        events = [
            {
                "name": "call",
                "external_customer_id": f"c{i % 3}",
                "external_id": f"cron-{i}",
                "timestamp": (noon - timedelta(days=1, seconds=i)).isoformat(),
            }
            for i in range(EVENTS)
        ]
        with local.client() as client:
            assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
            wait_for("the forwarder to send every event upstream", lambda: forwarded(client))

        yield local, upstream


def test_the_cron_line_reconciles_yesterday_on_a_fresh_install(
    tmp_path: Path, servers: tuple[Server, Server]
) -> None:
    install = Install(tmp_path, *servers)
    assert not install.reports.parent.exists()
    yesterdays = {(datetime.now(UTC) - timedelta(days=1)).date().isoformat()}
    done = install.run_job()
    yesterdays.add((datetime.now(UTC) - timedelta(days=1)).date().isoformat())  # midnight
    assert done.returncode == 0 and done.stdout == "", done
    reports = sorted(p.name for p in install.reports.glob("*.json"))
    assert len(reports) == 1 and reports[0].removesuffix(".json") in yesterdays, reports
    report = orjson.loads((install.reports / reports[0]).read_bytes())
    assert report["window"]["from"].startswith(reports[0].removesuffix(".json"))
    assert report["local"]["events"] == report["upstream"]["events"] == EVENTS
    assert not report["drift_found"]
    log = (install.reports / "last.log").read_text()
    assert "no drift" in log and "report written" in log, log


def test_a_failing_run_prints_its_log_for_cron_to_mail(
    tmp_path: Path, servers: tuple[Server, Server]
) -> None:
    install = Install(tmp_path, *servers)
    closed = f"http://127.0.0.1:{free_port()}"
    install.env_file.write_text(install.env_file.read_text() + f"METERLINE_URL={closed}\n")
    done = install.run_job()
    log = (install.reports / "last.log").read_text()
    assert closed in log, log  # what could not be reached
    # The log is the job's output, which cron mails to MAILTO.
    assert done.returncode == 0 and done.stdout == log, done
