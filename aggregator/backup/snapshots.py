"""Snapshots of a core's data dir, taken while it serves, and a data dir restored from one.

The protocol:

1. Every `every_seconds`, from start, a snapshot is written to `<to>/<UTC time>/`, through a
   folder renamed once complete (a snapshot seen is whole):
   - `meterline.duckdb`: a copy taken in one read transaction once every event applied so far
     is stored (`Store.snapshot`), with the positions it covers (the journal's, the topics'),
     and the segments it lists, linked to the data dir's files or, on another disk, to the
     newest snapshot's in `<to>` (a segment never changes: only new ones are written);
   - the ingest log (embedded mode): its witness of how far it was acknowledged, then its
     segments, so that what the log acknowledged after the copy is in it, applied at start
     (a segment pruned meanwhile: the snapshot is taken again);
   - `auth.sqlite3` (organizations, tokens, customer sessions), copied after the database:
     what it holds beyond it is kept again, alike, when the log is applied; `secret.key` if
     the data dir holds it;
   - `manifest.json`: when, the positions covered, the files' sizes.
2. Only the newest `kept` snapshots stay.
   What the core's snapshots did, by the schedule or asked, is kept for `/metrics` (`Taken`):
   when the last was taken (at start, the newest in `<to>`), and when one last failed.
3. `restore` copies a snapshot into an empty (or absent) data dir, and refuses any other: what
   is there (a database, or the `secret.key` and `auth.sqlite3` of `token create --init`)
   would be overwritten or left beside the snapshot's files. A core started on it applies what the
   log holds after the positions covered (Kafka mode: the journal from its offset, a replica
   converging on the others), so that a lost disk costs the log's replay only. Embedded, the
   ingest log is the only log: what it acknowledged after the snapshot is lost with the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from aggregator.auth import SECRET_FILE
from aggregator.errors import UsageError
from aggregator.settings import BackupSettings
from aggregator.store import (
    Store,
    checkpoints_folder,
    copy_checkpoint,
    copy_segments,
    ingest_log_repair,
    segments_folder,
)
from ingest.tasks import cancel_within

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATABASE = "meterline.duckdb"
AUTH = "auth.sqlite3"
ATTEMPTS = 3  # of one snapshot, when the ingest log pruned a segment during the copy
NAMED = 5  # of the entries found in a data dir that a restore refuses


class Taken:
    """The snapshots of a core since it started (step 2): when the last was taken and when one
    last failed (seconds since the epoch), and the schedule's period if it has one."""

    def __init__(self) -> None:
        self.last_at: float | None = None
        self.failed_at: float | None = None
        self.failures = 0
        self.every_seconds: float | None = None

    def took(self, at: float | None = None) -> None:
        self.last_at = max(self.last_at or 0.0, time.time() if at is None else at)

    def failed(self) -> None:
        self.failed_at = time.time()
        self.failures += 1


class Backups:
    """Step 1 and 2 in the background while entered (an async context manager)."""

    def __init__(
        self, store: Store, data_dir: Path, settings: BackupSettings, taken: Taken | None = None
    ) -> None:
        self._store = store
        self._data_dir = data_dir
        self._settings = settings
        self._taken = taken or Taken()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        to = self._settings.to
        to.mkdir(parents=True, exist_ok=True)
        self._taken.every_seconds = self._settings.every_seconds
        before = snapshots(to)
        if before:  # taken before this start: the schedule goes on from it
            with contextlib.suppress(OSError, ValueError, KeyError):
                created = orjson.loads((before[-1] / MANIFEST).read_bytes())["created_at"]
                self._taken.took(datetime.fromisoformat(created).timestamp())
        self._task = asyncio.create_task(self._run(), name="backups")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A snapshot cut short leaves only its temporary folder.
        await cancel_within(self._task, what="snapshots")

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                path = await self._take()
                self._taken.took()
                log.info("snapshot %s written in %.1f s", path, time.monotonic() - began)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._taken.failed()
                log.exception("a snapshot failed; the next is due as usual")
            await asyncio.sleep(max(0.0, self._settings.every_seconds - (time.monotonic() - began)))

    async def _take(self) -> Path:
        taken = await take(self._store, self._data_dir, self._settings.to)
        for old in snapshots(self._settings.to)[: -self._settings.kept]:
            shutil.rmtree(old, ignore_errors=True)
        return taken


async def take(store: Store, data_dir: Path, to: Path) -> Path:
    """One snapshot of the data dir `store` is open in, into a new folder of `to` (step 1)."""
    name = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    partial = to / f".{name}.partial"
    taken = snapshots(to)
    earlier = taken[-1] / DATABASE if taken else None
    for attempt in range(ATTEMPTS):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        covered = await store.snapshot(partial / DATABASE, earlier)
        try:
            log_dir = ingest_log_repair.log_directory(Path(store.path))
            await asyncio.to_thread(_copy_files, log_dir, data_dir, partial)
            break
        except FileNotFoundError:
            if attempt == ATTEMPTS - 1:
                raise
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "covers": {t: {str(p): o for p, o in ps.items()} for t, ps in covered.items()},
        "files": {p.name: p.stat().st_size for p in partial.iterdir() if p.is_file()},
    }
    (partial / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    final = to / name
    partial.rename(final)
    return final


def _copy_files(log_dir: Path, data_dir: Path, into: Path) -> None:
    if log_dir.is_dir():
        copy = into / log_dir.name
        copy.mkdir()
        files = [p for p in log_dir.iterdir() if p.is_file()]
        for path in sorted(files, key=lambda p: p.name != "acknowledged"):  # witness first
            shutil.copy2(path, copy / path.name)
    source = sqlite3.connect(data_dir / AUTH)
    target = sqlite3.connect(into / AUTH)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    if (data_dir / SECRET_FILE).exists():
        shutil.copy2(data_dir / SECRET_FILE, into / SECRET_FILE)


def snapshots(to: Path) -> list[Path]:
    """The whole snapshots in `to`, oldest first (none where there is no `to` yet). Not a
    `.<name>.partial` folder a copy cut short left, even if its manifest got there."""
    if not to.is_dir():
        return []
    return sorted(
        p
        for p in to.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()
    )


def restore(snapshot: Path, data_dir: Path, *, stopped: bool = False) -> dict[str, Any]:
    """Step 3: `snapshot` (a snapshot's folder, or a folder of them: the newest; if `stopped`,
    also the data dir of a core that has stopped) into `data_dir`, which must be empty or
    absent; the snapshot's manifest."""
    _refuse_unless_empty(data_dir)
    if stopped and not (snapshot / MANIFEST).exists() and (snapshot / DATABASE).exists():
        return _copy_stopped(snapshot, data_dir)
    if not (snapshot / MANIFEST).exists():
        found = snapshots(snapshot) if snapshot.is_dir() else []
        if not found:
            raise UsageError(f"{snapshot} is no snapshot (no {MANIFEST}) nor a folder of them")
        snapshot = found[-1]
    with _filling(data_dir):
        for path in snapshot.iterdir():
            if path.name == MANIFEST:
                continue
            if path.is_dir():
                shutil.copytree(path, data_dir / path.name)
            else:
                shutil.copy2(path, data_dir / path.name)
    manifest: dict[str, Any] = orjson.loads((snapshot / MANIFEST).read_bytes())
    manifest["snapshot"] = str(snapshot)
    return manifest


def _copy_stopped(source: Path, data_dir: Path) -> dict[str, Any]:
    """A stopped core's data dir into `data_dir`, as a snapshot of it would be."""
    database = source / DATABASE
    with database.open("rb+") as file:  # DuckDB holds a lock on the file while it is open
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"{source} is in use: stop its core first") from None
        fcntl.lockf(file, fcntl.LOCK_UN)
    with _filling(data_dir):
        for name in (DATABASE, f"{DATABASE}.wal"):
            if (source / name).exists():
                shutil.copy2(source / name, data_dir / name)
        segments = segments_folder(database)
        if segments.is_dir():  # the files it does not list are deleted where it opens
            copy_segments(sorted(segments.iterdir()), segments_folder(data_dir / DATABASE))
        copy_checkpoint(checkpoints_folder(database), checkpoints_folder(data_dir / DATABASE))
        _copy_files(ingest_log_repair.log_directory(database), source, data_dir)
    created = datetime.fromtimestamp(database.stat().st_mtime, UTC).isoformat()
    return {"created_at": created, "covers": {}, "snapshot": str(source)}


@contextlib.contextmanager
def _filling(data_dir: Path) -> Iterator[None]:
    """`data_dir` (empty or absent) made, for the block to fill; if it fails, left as it was
    (a file system's refusal said as a UsageError): no half-restored data dir to start on."""
    existed = data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as exc:
        if existed:
            for path in data_dir.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UsageError(
                f"cannot restore into {data_dir} ({exc.strerror}): pass a --data-dir this user"
                " may write in"
            ) from None
        raise


def _refuse_unless_empty(data_dir: Path) -> None:
    """A `UsageError` naming what `data_dir` holds, if it is not an empty folder or absent."""
    if not data_dir.exists():
        return
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir} is a file: restore into an empty or absent data dir")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in data_dir.iterdir())
    if not found:
        return
    named = ", ".join(found[:NAMED]) + (
        f" and {len(found) - NAMED} more" if len(found) > NAMED else ""
    )
    raise UsageError(
        f"{data_dir} is not empty (it holds {named}): restore into an empty or absent data dir,"
        " or move these aside first"
    )
