"""The README works as written: its `sh` blocks run in order, in one shell, against a fresh
`make up`, and print exactly what the `output` block after each shows (`...` stands for any
text). A block without an `output` block must print nothing. Blocks that need what cannot run
here (Polar itself, Docker) are fenced `console` and are not run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Where `make up` serves, as the README's commands name it: the test serves on a free port
# instead (a `make up` of the reader's own may hold this one) and runs the blocks with it.
README_ADDRESS = "127.0.0.1:8000"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
MARK = "@@readme-block@@"

pytestmark = pytest.mark.slow


@dataclass(frozen=True, slots=True)
class Block:
    line: int
    code: str
    output: str


def sh_blocks(text: str) -> list[Block]:
    """Every `sh` block with the `output` block right after it ("" when there is none)."""
    fences = [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1, m.start(), m.end())
        for m in FENCE.finditer(text)
    ]
    blocks = []
    for i, (lang, code, line, _, end) in enumerate(fences):
        if lang != "sh":
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        shown = after is not None and after[0] == "output" and not text[end : after[3]].strip()
        blocks.append(Block(line, code, after[1] if shown and after else ""))
    return blocks


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


def test_every_shell_block_runs_as_written(tmp_path: Path) -> None:
    blocks = sh_blocks(README.read_text())
    # The first block is how to get here: `make up` (which this test runs) and `make test`.
    first, *rest = blocks
    commands = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert commands == ["make up", "make test"], first.code
    assert rest, "no shell blocks after the first"

    # Install (or bring up to date) the repository's own .venv first, as `make up` would: in
    # the scratch checkout below make must find it current, or it would reinstall meterline
    # from the scratch's symlinks and leave the venv pointing at a deleted folder.
    subprocess.run(["make", "--silent", ".venv/.installed"], cwd=ROOT, check=True)
    # A scratch checkout: the repository's files (and its installed .venv), no data dir.
    for entry in ROOT.iterdir():
        if not entry.name.startswith((".meterline", ".git", ".pytest_cache", ".mypy_cache")):
            (tmp_path / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERLINE_", "MAKE"))}
    address = f"127.0.0.1:{free_port()}"
    env["METERLINE_URL"] = f"http://{address}"  # what commands reach without --url
    with _make_up(tmp_path, env, address) as banner:
        script = "".join(f"printf '\\n{MARK}\\n'\n{block.code}" for block in rest)
        script = script.replace(README_ADDRESS, address)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # as a terminal shows them: progress lines go to stderr
            text=True,
            timeout=180,
        )
    outputs = done.stdout.split(f"\n{MARK}\n")[1:]
    ran = len(outputs)
    where = rest[ran - 1].line if ran else first.line
    assert done.returncode == 0, (
        f"the block at README line {where} failed ({done.returncode}), printing:\n"
        f"{(outputs or [''])[-1][-3000:]}"
    )
    assert ran == len(rest)
    for block, printed in zip(rest, outputs, strict=True):
        assert matches(block.output, printed), (
            f"the block at README line {block.line} printed:\n{printed}\n"
            f"--- the README shows:\n{block.output}"
        )
    assert "development token" in banner()


@contextlib.contextmanager
def _make_up(cwd: Path, env: dict[str, str], address: str) -> Iterator[Callable[[], str]]:
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
        try:
            return httpx.get(f"http://{address}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(serving, timeout=120)
        yield lambda: "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
