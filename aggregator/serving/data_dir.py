"""The data dir as a core's start takes it (`take`): made if missing, found writable and held by
no other process before anything is made in it, each failure a UsageError saying what to do;
and left as it was when the start fails (`Taken.undo`): a data dir the start made is removed,
one that existed loses what the start made in it (the secret, the token registry, the database
and the files beside it) and keeps everything it had."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aggregator.auth import AUTH_FILE, SECRET_FILE
from aggregator.errors import UsageError
from aggregator.settings import CoreSettings


@dataclass(slots=True)
class Taken:
    settings: CoreSettings
    made: Path | None  # the outermost folder the start made (the data dir or a parent of it)
    had: frozenset[str]  # what the data dir held before, if it existed
    served: bool = False  # the start is over: from now on the data dir is the server's

    def undo(self) -> None:
        """Leave the data dir as the start found it (the start failed)."""
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)
            return
        data_dir = self.settings.data_dir
        # What a start makes, by the file that heads each: a file the data dir had is left to
        # its owner with the files beside it (SQLite's and DuckDB's own), and nothing else is
        # the start's to remove.
        made = tuple(
            h for h in (SECRET_FILE, AUTH_FILE, self.settings.database.name) if h not in self.had
        )
        for name in set(os.listdir(data_dir)) - self.had:
            if name.startswith(made):
                path = data_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def take(settings: CoreSettings) -> Taken:
    """The data dir made if missing, then checked: a folder this process may write in, whose
    database no other process holds (DuckDB's lock), so that a start that cannot work ends
    before the data dir is touched or a broker waited for."""
    data_dir = settings.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(
            f"the data dir {data_dir} is a file, not a folder: pass a folder with --data-dir"
        )
    made = None
    for folder in (data_dir, *data_dir.parents):
        if folder.exists():
            break
        made = folder
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the data dir {data_dir} ({exc.strerror}): pass a writable"
            " --data-dir (or METERLINE_DATA_DIR)"
        ) from None
    taken = Taken(settings, made, frozenset() if made else frozenset(os.listdir(data_dir)))
    try:
        _writable(data_dir)
        holder = _holder(settings.database)
        if holder is not None:
            raise UsageError(locked(settings, f"process {holder}"))
    except BaseException:
        taken.undo()
        raise
    return taken


def _writable(data_dir: Path) -> None:
    """UsageError unless this process can make files in `data_dir`: a file made and removed
    (on Linux one that never has a name there)."""
    try:
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot write in the data dir {data_dir} ({exc.strerror}): pass a writable"
            " --data-dir (or METERLINE_DATA_DIR), or make this one writable for this user"
        ) from None


def _holder(database: Path) -> int | None:
    """The process that holds DuckDB's lock on `database` (a write lock on the whole file), as
    the kernel lists it in /proc/locks; None if none does, or where that cannot be read (DuckDB
    says so itself when the file is opened). Read there, rather than by taking the lock, since
    closing a file would drop this process's own locks on it."""
    try:
        stat = database.stat()
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in locks:
        # `1: POSIX  ADVISORY  WRITE 1234 fe:00:2179100 0 EOF` ("->" marks a waiter)
        fields = line.split()
        if len(fields) >= 6 and fields[1] != "->" and fields[3] == "WRITE" and fields[5] == where:
            pid = int(fields[4])
            if pid not in (os.getpid(), -1):  # this process's own: DuckDB shares it within one
                return pid
    return None


def locked(settings: CoreSettings, who: str) -> str:
    """One line for a data dir whose database another process holds."""
    return (
        f"the data dir {settings.data_dir} is in use: {who} holds {settings.database}"
        " (another meterline on it?); stop that process, or pass another --data-dir"
    )
