"""The docs site works as written: `mkdocs build --strict` finds no broken link or anchor, and
every page's examples run as shown. A page's `sh` blocks and its `python` blocks run in order,
in one shell, against one `make up` that every page of a test worker shares (so a page must not
depend on what another page made: its own customers, ids and meters), and each prints exactly
what the `output` block after it shows (`...` stands for any text; no `output` block: nothing).
A `python` block is saved as the file its title names and run with `python FILE` in that
shell, as the page says to: it reads what the page exported (`os.environ["TOKEN"]`). Blocks
fenced `console` or `py` are shown, not run: they need what cannot run here (Polar itself,
Docker, an LLM vendor's key), as the page says."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deadline import seconds_left
from tests.test_readme import ROOT, examples, make_up, run_as_shown, scratch

pytestmark = pytest.mark.processes

DOCS = ROOT / "docs"
# The pages' examples run in four modules, each with its own server, so that test workers
# share them out (the suite hands out whole modules): the guides (`test_docs_guides.py`), the
# SDK and operations (`test_docs_more.py`), the pages that start with `make cluster`
# (`test_docs_cluster.py`, against one), the rest here.
GROUPS = (("guides",), ("sdk", "operations"))
ON_CLUSTER = tuple(
    DOCS / page for page in ("operations/kafka.md", "operations/replicas-and-shards.md")
)


def pages(*folders: str) -> list[Path]:
    """The pages with examples in `folders` (none: those in no group's folder), but those
    that run on `make cluster`."""
    grouped = {f for group in GROUPS for f in group}
    return sorted(
        p
        for p in DOCS.rglob("*.md")
        if (
            p.relative_to(DOCS).parts[0] in folders
            if folders
            else p.relative_to(DOCS).parts[0] not in grouped
        )
        and p not in ON_CLUSTER
        and examples(p.read_text())
    )


def page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    built = subprocess.run(
        [str(ROOT / ".venv/bin/mkdocs"), "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds_left(),
    )
    assert built.returncode == 0, built.stderr[-4000:]


def test_every_page_with_examples_is_run() -> None:
    every = {p for p in DOCS.rglob("*.md") if examples(p.read_text())}
    grouped = {p for group in GROUPS for p in pages(*group)}
    assert set(pages()) | grouped | set(ON_CLUSTER) == every


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], str]]:
    """One `make up` in a scratch checkout for the pages of this module, as a reader's."""
    path = tmp_path_factory.mktemp("docs")
    env, address = scratch(path)
    with make_up(path, env, address):
        yield path, env, address


def run_page(page: Path, served: tuple[Path, dict[str, str], str]) -> None:
    path, env, address = served
    run_as_shown(examples(page.read_text()), path, env, address, str(page.relative_to(ROOT)))


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_the_examples_run_as_shown(page: Path, served: tuple[Path, dict[str, str], str]) -> None:
    run_page(page, served)
