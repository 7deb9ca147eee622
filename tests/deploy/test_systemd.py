"""deploy/meterline.service, checked by systemd's own tools: `systemd-analyze verify` accepts the
unit (its ExecStart pointed at this checkout's `meterline`), and deploy/meterline-sysusers.conf,
applied by `systemd-sysusers` to an empty root, makes the user and group the unit runs as
(without it the unit fails with status 217/USER)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

DEPLOY = Path(__file__).parents[2] / "deploy"
UNIT = DEPLOY / "meterline.service"
INSTALLED = "/opt/meterline/venv/bin/meterline"


def _service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    return unit["Service"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    meterline = shutil.which("meterline", path=str(Path(sys.executable).parent))
    assert meterline is not None
    assert INSTALLED in _service()["ExecStart"]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, meterline))
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def test_sysusers_makes_the_user_and_group_the_unit_runs_as(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(DEPLOY / "meterline-sysusers.conf")],
        capture_output=True,
        check=True,
    )
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    service = _service()
    user = users[service["User"]]
    assert service["Group"] in groups
    assert user[5] == "/var/lib/meterline"  # its home: the unit's StateDirectory
    assert service["StateDirectory"] == "meterline"
