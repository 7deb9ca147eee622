"""The README works as written: its `sh` blocks run in order, in one shell, against a fresh
`make up`, and print exactly what the `output` block after each shows (`...` stands for any
text). A block without an `output` block must print nothing. A `python` block is a program the
page says to save as the file its title names and run with `python FILE` in that shell: so it
is run. Blocks that need what cannot run here (Polar itself, Docker) are fenced `console` and
are not run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.deadline import seconds_left, wait_for
from tests.processes import answers_health, free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Where `make up` serves, as the README's commands name it: the test serves on a free port
# instead (a `make up` of the reader's own may hold this one) and runs the blocks with it.
README_ADDRESS = "127.0.0.1:8000"
# A fence: its language, its attributes (`title="send.py"`), its code.
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'title="([^"]*)"')
MARK = "@@readme-block@@"

pytestmark = pytest.mark.processes


@dataclass(frozen=True, slots=True)
class Block:
    line: int
    code: str
    output: str
    file: str = ""  # a `python` block's title: the file the page says to save it as
    said: str = ""  # the page's text between the block before and this one


RUN = {"sh", "python"}
# A `python` block is saved as its file where the shell is, and run there as the page says, so
# it reads what the blocks before it exported (a file of the checkout is never written over).
PYTHON = "test ! -L {file}\ncat > {file} <<'MLPY_EOF'\n{code}MLPY_EOF\npython {file}\n"


def examples(text: str) -> list[tuple[str, Block]]:
    """Every `sh` and `python` block, with the `output` block right after it ("" if none)."""
    fences = [
        (m.group(1), m.group(3), text.count("\n", 0, m.start()) + 1, m.start(), m.end(), m)
        for m in FENCE.finditer(text)
    ]
    found = []
    for i, (lang, code, line, start, end, match) in enumerate(fences):
        if lang not in RUN:
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        shown = after is not None and after[0] == "output" and not text[end : after[3]].strip()
        title = TITLE.search(match.group(2))
        said = text[fences[i - 1][4] if i else 0 : start]
        block = Block(line, code, after[1] if shown and after else "", title[1] if title else "")
        found.append((lang, replace(block, said=said)))
    return found


def test_every_python_block_says_how_to_run_it() -> None:
    """Each is a file to save and run, as the text before it says (pasted into the REPL, a
    program with blocks is a SyntaxError)."""
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    blocks = [(p, b) for p in pages for lang, b in examples(p.read_text()) if lang == "python"]
    assert blocks
    for page, block in blocks:
        where = f"{page.relative_to(ROOT)} line {block.line}"
        assert re.fullmatch(r"\w+\.py", block.file), f"{where}: no title naming its file"
        assert f"`python {block.file}`" in block.said, f"{where}: says not to run {block.file}"
        assert not (ROOT / block.file).exists(), f"{where}: {block.file} is the checkout's"


def matches(shown: str, printed: str) -> bool:
    """`printed` is `shown`, where each `...` in `shown` stands for any text (newlines too)."""
    parts = [re.escape(part) for part in shown.strip().split("...")]
    return re.fullmatch(".*?".join(parts), printed.strip(), re.DOTALL) is not None


def test_the_matcher() -> None:
    assert matches('{"id":"...","n":1}', '{"id":"abc","n":1}\n')
    assert not matches('{"id":"...","n":1}', '{"id":"abc","n":2}')
    assert matches("", "\n")
    assert not matches("", "something")
    assert matches("a\n...\nz", "a\nb\nc\nz")


def test_every_example_runs_as_written(tmp_path: Path) -> None:
    # The first block is how to get here: `make up` (which this test runs) and `make test`.
    (_, first), *rest = examples(README.read_text())
    commands = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert commands == ["make up", "make test"], first.code
    assert rest, "no examples after the first"
    env, address = scratch(tmp_path)
    with make_up(tmp_path, env, address) as banner:
        run_as_shown(rest, tmp_path, env, address, "README.md")
    assert "development token" in banner()


def scratch(path: Path) -> tuple[dict[str, str], str]:
    """A scratch checkout in `path`: the repository's files (and its installed .venv), no data
    dir; the environment to run its commands in, and a free address to serve on."""
    # Install (or bring up to date) the repository's own .venv first, as `make up` would: in
    # the scratch checkout make must find it current, or it would reinstall meterline from the
    # scratch's symlinks and leave the venv pointing at a deleted folder.
    subprocess.run(["make", "--silent", ".venv/.installed"], cwd=ROOT, check=True)
    for entry in ROOT.iterdir():
        if not entry.name.startswith((".meterline", ".git", ".pytest_cache", ".mypy_cache")):
            (path / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERLINE_", "MAKE"))}
    address = f"127.0.0.1:{free_port()}"
    env["METERLINE_URL"] = f"http://{address}"  # what commands reach without --url
    return env, address


def run_as_shown(
    blocks: list[tuple[str, Block]],
    cwd: Path,
    env: dict[str, str],
    address: str | dict[str, str],
    page: str,
) -> None:
    """Run `blocks` in order in one shell against the server on `address` (or with each
    address the blocks name put as the dict says); each must print what its `output` block
    shows."""
    script = "".join(
        f"printf '\\n{MARK}\\n'\n"
        + (PYTHON.format(code=b.code, file=b.file) if lang == "python" else b.code)
        for lang, b in blocks
    )
    addresses = address if isinstance(address, dict) else {README_ADDRESS: address}
    for shown, served in addresses.items():
        script = script.replace(shown, served)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as a terminal shows them: progress lines go to stderr
        text=True,
        timeout=seconds_left(),
    )
    outputs = done.stdout.split(f"\n{MARK}\n")[1:]
    ran = len(outputs)
    assert done.returncode == 0, (
        f"the block at {page} line {blocks[max(ran - 1, 0)][1].line} failed"
        f" ({done.returncode}), printing:\n{(outputs or [''])[-1][-3000:]}"
    )
    assert ran == len(blocks)
    for (_, block), printed in zip(blocks, outputs, strict=True):
        assert matches(block.output, printed), (
            f"the block at {page} line {block.line} printed:\n{printed}\n"
            f"--- {page} shows:\n{block.output}"
        )


@contextlib.contextmanager
def make_up(cwd: Path, env: dict[str, str], address: str) -> Iterator[Callable[[], str]]:
    """`make up` in `cwd` on `address` until the block ends; yields a reader of what it has
    printed."""
    proc = subprocess.Popen(
        ["make", "up", f"PORT={address.rsplit(':', 1)[1]}"],
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make and meterline, stopped together
    )
    lines: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()

    def serving() -> bool:
        assert proc.poll() is None, "make up exited:\n" + "".join(lines[-40:])
        return answers_health(f"http://{address}", timeout=2)

    try:
        wait_for(f"make up to serve on {address}", serving)
        yield lambda: "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=max(seconds_left(), 10))  # a drained stop, else a kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
