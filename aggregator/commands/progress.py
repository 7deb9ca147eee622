"""Progress of long command-line work (reconcile's scans, waiting for a backfill, benchmark
runs): a bar on a terminal, and plain lines otherwise, so that logs, pipes and cron mail get a
few readable lines instead of a redrawn bar.

    with Progress(Console(stderr=True)) as progress:
        task = progress.task("local events", total=5000)
        task.advance(100)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from rich import progress as bar
from rich.console import Console

from meters.times import NEVER

# Plain lines: one per task at most this often, and whenever a task completes.
PLAIN_EVERY_SECONDS = 10.0


class Progress:
    """A context manager holding tasks; on a terminal (`console.is_terminal`) they are bars."""

    def __init__(
        self,
        console: Console,
        *,
        every_seconds: float = PLAIN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.every_seconds = every_seconds
        self.clock = clock
        self.bars = (
            bar.Progress(
                bar.TextColumn("{task.description}"),
                bar.BarColumn(),
                bar.MofNCompleteColumn(),
                bar.TimeElapsedColumn(),
                console=console,
            )
            if console.is_terminal
            else None
        )
        self._tasks: list[Task] = []

    def task(self, description: str, total: int | None = None) -> Task:
        """A new task; `total` may come later (`Task.update`)."""
        self._tasks.append(Task(self, description, total))
        return self._tasks[-1]

    def __enter__(self) -> Self:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bars is not None:
            self.bars.stop()
            return
        for task in self._tasks:  # where each one ended, if not said yet
            task.line()


class Task:
    def __init__(self, progress: Progress, description: str, total: int | None) -> None:
        self.description = description
        self.total = total
        self.completed = 0
        self._progress = progress
        self._id = (
            None if progress.bars is None else progress.bars.add_task(description, total=total)
        )
        self._said: str | None = None
        self._said_at = NEVER

    def advance(self, amount: int = 1) -> None:
        self.update(completed=self.completed + amount)

    def update(self, *, completed: int | None = None, total: int | None = None) -> None:
        self.completed = self.completed if completed is None else completed
        self.total = self.total if total is None else total
        bars = self._progress.bars
        if bars is not None and self._id is not None:
            bars.update(self._id, completed=self.completed, total=self.total)
            return
        done = self.total is not None and self.completed >= self.total
        if done or self._progress.clock() - self._said_at >= self._progress.every_seconds:
            self.line()

    def line(self) -> None:
        """Print where the task is (plain mode), unless that was the last line printed."""
        text = f"{self.description}: {self.completed:,}"
        if self.total is not None:
            percent = 100 * self.completed // self.total if self.total else 100
            text += f" of {self.total:,} ({percent}%)"
        if text != self._said:
            self._progress.console.print(text, markup=False, highlight=False)
            self._said, self._said_at = text, self._progress.clock()
