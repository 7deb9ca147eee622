"""A real `meterline up` process shared by the API tests of one session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.processes import MeterlineServer


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterlineServer]:
    with MeterlineServer(tmp_path_factory.mktemp("meterline")) as running:
        yield running
