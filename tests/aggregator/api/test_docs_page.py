"""The API reference page (`/docs`) as a person sees it, in Debian's headless chromium: the
descriptions' markdown rendered (code spans; nothing of theirs runs as markup), and no
word broken across lines, even in a narrow window."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.aggregator.console.test_console import CHROMIUM_ARGS
from tests.inprocess import ServedCore

pytestmark = pytest.mark.processes


def test_markdown_is_rendered_and_no_word_is_broken(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install)"
    with ServedCore(tmp_path / "core") as core, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 420, "height": 900})
            page.goto(f"{core.url}/docs")
            page.wait_for_selector("nav a")
            intro = page.inner_html("main > p")
            assert "<code>Authorization: Bearer &lt;organization access token&gt;</code>" in intro
            text = page.inner_text("main")
            assert "`" not in text and "**" not in text, "markdown shown as written"
            # An inline element laid out over two lines has two client rectangles.
            broken = page.eval_on_selector_all(
                "nav a, summary code, td code",
                "(found) => found.filter((e) => e.getClientRects().length > 1)"
                ".map((e) => e.textContent)",
            )
            assert broken == []
        finally:
            browser.close()
