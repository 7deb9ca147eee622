"""Shared pytest configuration: hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default
ci; `fast` in the fast tier); the fast tier (`--fast`) and the check that only tests marked
`processes` start one (`tests.tiers`); each test's deadline and hang guard, stretched by the
machine's load (`tests.deadline`); a local S3 server (moto's) for the tests that need one."""

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests import deadline, tiers
from tests.processes import free_port, kill_leftovers

settings.register_profile("ci", max_examples=50, deadline=None, print_blob=True)
settings.register_profile("fast", max_examples=10, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("nightly", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="the fast tier: only the tests that start no process (not marked `processes`)"
        " and measure no time (not `serial`); property tests with a fifth of their examples"
        " (the hypothesis profile `fast`, unless HYPOTHESIS_PROFILE says another)",
    )


def pytest_configure(config: pytest.Config) -> None:
    tiers.install()
    if config.getoption("fast") and "HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("fast")  # before the test modules read it (`examples`)


def pytest_sessionfinish() -> None:
    kill_leftovers()  # of tests that failed before stopping them


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--fast`: the tests marked `processes` or `serial` left out. Then modules with long
    tests (`processes`, `slow`) first, each module's tests in their order: `make test` spreads
    modules over its workers in this order, and the longest starting first leaves short ones,
    not one long module, to finish the run (the longest-first rule)."""
    if config.getoption("fast"):
        left_out = [i for i in items if i.get_closest_marker(tiers.MARK) or _serial(i)]
        config.hook.pytest_deselected(items=left_out)
        items[:] = [i for i in items if i not in left_out]
    long = {i.module for i in items if i.get_closest_marker(tiers.MARK) or _slow(i)}
    items.sort(key=lambda item: item.module not in long)


def _serial(item: pytest.Item) -> bool:
    return item.get_closest_marker("serial") is not None


def _slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """One deadline from the test's setup to its teardown; the hang guard (pytest-timeout,
    read after this) stretched by the load at its start, unless the test sets its own; and
    whether the test may start processes."""
    hang = float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)
    if hang and item.get_closest_marker("timeout") is None:
        item.add_marker(pytest.mark.timeout(hang * deadline.load_factor()))
    marked = item.get_closest_marker(tiers.MARK) is not None
    with deadline.budget(), tiers.running(marked):
        yield


@pytest.fixture(autouse=True)
def _no_unmarked_process() -> Iterator[None]:
    """A process the test started unmarked, where the error was not the test's own (a
    server's thread): the test fails here."""
    yield
    assert not tiers.started_unmarked(), (
        f"started processes without the mark `{tiers.MARK}`: {tiers.started_unmarked()}"
    )


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer  # a second of imports, for the tests using it

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
