"""Which tests may start processes: those marked `processes`, in every tier.

A test that starts a process (a meterline, a broker, the CLI, a browser, any tool, a
validation worker) without the mark fails, naming the command: so `make test-fast`, which
leaves the marked tests out, runs exactly the tests that start none, and `make test` keeps the
marks true. A process started from a thread of the test (a server's validation workers) counts
too: the test fails at its teardown."""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import multiprocessing.process
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

MARK = "processes"


class UnmarkedProcess(RuntimeError):
    """A process started by a test not marked `processes`."""


_allowed = True  # outside tests (collection, the session's end): as the code does
_started: list[str] = []  # what unmarked tests started, reported at their teardown


def install() -> None:
    """Check every process start from now on (subprocess, asyncio's subprocesses, and
    multiprocessing, which all start through these two)."""
    # ctypes looks a library up by running `ldconfig -p`, each time: the edge's admission
    # does, for the C library, whenever an app is built. Its answer cannot change while the
    # tests run; asked once here, it is no process of a test's.
    find = functools.cache(ctypes.util.find_library)
    find("c")
    ctypes.util.find_library = find

    popen_new = subprocess.Popen.__new__
    assert popen_new is object.__new__

    def checked_popen(cls: type[Any], args: Any, *rest: Any, **options: Any) -> Any:
        _check(args)
        return popen_new(cls)  # object's: Popen has no __new__ of its own

    subprocess.Popen.__new__ = checked_popen  # type: ignore[method-assign]
    process_start = multiprocessing.process.BaseProcess.start

    def checked_start(self: multiprocessing.process.BaseProcess) -> None:
        _check(f"a multiprocessing worker ({self.name})")
        process_start(self)

    multiprocessing.process.BaseProcess.start = checked_start  # type: ignore[method-assign]


def _check(command: Any) -> None:
    if _allowed:
        return
    shown = " ".join(map(str, command)) if isinstance(command, list | tuple) else str(command)
    if threading.current_thread() is not threading.main_thread():
        _started.append(shown)  # the error may stay in that thread: the teardown says it
    raise UnmarkedProcess(f"started a process ({shown[:200]}): mark the test `{MARK}`")


@contextlib.contextmanager
def running(marked: bool) -> Iterator[None]:
    """While a test runs (setup to teardown): whether it may start processes."""
    global _allowed
    _allowed = marked
    _started.clear()
    try:
        yield
    finally:
        _allowed = True


def started_unmarked() -> list[str]:
    """The commands the running test's threads started without the mark."""
    return list(_started)
