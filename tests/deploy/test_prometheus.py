"""deploy/prometheus, checked by Prometheus's own `promtool` (Debian's `prometheus`, which
`make test` installs): the scrape configuration as shipped (its token file beside it, which the
Compose file mounts over), the alerting rules, and their unit tests (`alerts_test.yml`: each
alert fires when it should, with its labels and summary, and not when it should not). The
metrics the rules name are served from the start (`test_monitoring` reads them live)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

PROMETHEUS = Path(__file__).parents[2] / "deploy" / "prometheus"


@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=lambda c: " ".join(c),
)
def test_promtool_accepts_it(command: list[str]) -> None:
    checked = subprocess.run(
        ["promtool", *command], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
