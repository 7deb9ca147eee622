"""Shared pytest configuration: hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default
ci); each test's deadline and hang guard, stretched by the machine's load (`tests.deadline`); a
local S3 server (moto's) for the tests that need one."""

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from moto.server import ThreadedMotoServer

from tests import deadline
from tests.processes import free_port, kill_leftovers

settings.register_profile("ci", max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("nightly", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionfinish() -> None:
    kill_leftovers()  # of tests that failed before stopping them


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first, each module's tests in their order: `make test` spreads
    modules over its workers in this order, and the longest starting first leaves short ones,
    not one long module, to finish the run (the longest-first rule)."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """One deadline from the test's setup to its teardown; the hang guard (pytest-timeout,
    read after this) stretched by the load at its start, unless the test sets its own."""
    hang = float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)
    if hang and item.get_closest_marker("timeout") is None:
        item.add_marker(pytest.mark.timeout(hang * deadline.load_factor()))
    with deadline.budget():
        yield


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
