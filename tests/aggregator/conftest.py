"""A real `meterline up` process shared by the API tests of one session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import MeterlineServer, token_cli


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterlineServer]:
    with MeterlineServer(tmp_path_factory.mktemp("meterline")) as running:
        yield running


def new_org_token(data_dir: Path, org: str) -> str:
    result = token_cli(data_dir, "create", "--org", org)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
