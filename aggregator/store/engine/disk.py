"""A full disk under the data dir, told apart from other write failures: it is the operator's
to fix, not a bug, so a request meeting it is answered 503 `StorageFull` (nothing of it was
stored; retry) instead of 500, and `/healthz` says `degraded` until a write succeeds again.
DuckDB ends a transaction whose COMMIT could not write its WAL and takes writes again once
there is space (`rows.rollback`), so recovery needs no restart. (A checkpoint that meets a full
disk is different: DuckDB invalidates the database, so the flusher checkpoints only when there is
room, and `/healthz` answers 503 `failed` if it happens anyway: the process must restart.)"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb

from meters.times import now_us

_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How DuckDB and SQLite word it (they raise their own errors, not OSError).
_WORDS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, says the disk is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _ERRNOS:
            return True
        if any(word in str(seen) for word in _WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fatal(exc: BaseException) -> bool:
    """Whether `exc` says DuckDB invalidated the database (after a checkpoint that could not
    write its file, for one): every later statement fails until the process restarts."""
    return isinstance(exc, duckdb.FatalException) or "database has been invalidated" in str(exc)


@dataclass(frozen=True, slots=True)
class Failure:
    at_us: int
    reason: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        return cls(now_us(), str(exc).splitlines()[0][:300])


class DiskHealth:
    """The latest write that found the disk full, until a write succeeds (any thread)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        self.failure: Failure | None = None
        self.lost_database: Failure | None = None  # `fatal`: for good, until a restart

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failure = Failure.of(exc)

    def lost(self, exc: BaseException) -> None:
        with self._lock:
            if self.lost_database is None:
                self.lost_database = Failure.of(exc)

    def succeeded(self) -> None:
        if self.failure is not None:
            with self._lock:
                self.failure = None

    def free_bytes(self) -> int:
        stat = os.statvfs(self._folder)
        return stat.f_bavail * stat.f_frsize
