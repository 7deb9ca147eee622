"""The SDK's and the operations pages' examples, as `tests/test_docs.py` runs the others (a
module of their own: a test worker of their own, and their own server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_docs import page_id, pages, run_page, served

__all__ = ["served"]  # the module's server (a fixture)

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("page", pages("sdk", "operations"), ids=page_id)
def test_the_examples_run_as_shown(page: Path, served: tuple[Path, dict[str, str], str]) -> None:
    run_page(page, served)
