"""Shared pytest configuration: hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default ci)."""

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("nightly", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first, each module's tests in their order: `make test` spreads
    modules over its workers in this order, and the longest starting first leaves short ones,
    not one long module, to finish the run (the longest-first rule)."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)
