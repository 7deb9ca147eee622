"""One `meterline up` shared by the API tests of a session (of a worker, under xdist), served
from a thread of the test process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.inprocess import ServedCore


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedCore]:
    with ServedCore(tmp_path_factory.mktemp("meterline")) as running:
        yield running
