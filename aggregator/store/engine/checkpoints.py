"""Checkpoints: the hot state a start would otherwise rebuild from every stored event, written
beside the database so that a start reads it back instead (decision 17).

A checkpoint holds the dedupe keys (`Dedupe`'s sorted runs of fingerprints and seqs: rebuilt
from 10 M events, they cost a start about 2 s) and `through`, the greatest seq of the events
stored when it was taken. The keys' home stays the events: a checkpoint is a snapshot of what
they derive, and a key it holds whose event is gone is harmless (a held fingerprint is only a
candidate, checked against the event stored with its seq).

The protocol:

1. A thread of its own takes one every `every_seconds` once keys were added, or as soon as
   `every_keys` keys were added since the last (a start then reads the keys of at most that
   many events from DuckDB, however fast they come), and one at a clean stop (`close`, after
   the flusher stored everything).
2. Under the flusher's `exclusive` (no flush, and no writer job between its COMMIT and its
   effects on memory): `through` is read from DuckDB and the runs held are listed. Every key
   of an event stored with a seq up to `through` is among them: a key is held from its
   event's commit, before that event is stored.
3. Outside it, each run not written before is written once, as `keys-<n>.npy` (fingerprints
   and seqs in one file), and fsynced: runs never change (a merge makes a new one).
4. The manifest (`checkpoint-<n>.json`: `through`, the run files and their byte sizes) is
   written to a temporary file, fsynced and renamed into place: a manifest seen is whole. The
   `KEPT` newest manifests stay, with the files they name; everything else is deleted.
5. At open (`newest`): the newest manifest whose files are all there at their sizes, and whose
   `through` the database has reached (else it is another database's, or one restored from
   before it), is used: its runs are loaded, and only the keys of events stored after
   `through` are read from DuckDB. A torn or unusable one: the one before; none: every key is
   read from DuckDB, as a data dir of a version before checkpoints. A snapshot carries the
   newest beside its database (`copy_newest`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import duckdb
import numpy as np
import numpy.typing as npt
import orjson

from aggregator.store.engine.dedupe import Dedupe
from aggregator.store.engine.ingest_log import fsync_directory
from aggregator.store.engine.segments import copy_files

log = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Run = tuple[U64, I64]
KEPT = 2  # manifests kept: the newest, and the one before in case it is unusable
_POLL_SECONDS = 0.5  # how often the thread counts the keys added
_MANIFEST = "checkpoint-{:012d}.json"
_RUN = "keys-{:012d}.npy"


def folder(database: Path) -> Path:
    """Where a database's checkpoints are."""
    return database.with_name(database.name + ".checkpoints")


@dataclass(frozen=True, slots=True)
class Found:
    """A usable checkpoint: the greatest seq it covers, its runs of keys (in memory, or mapped
    from their files where they are as large as `Dedupe`'s spilled runs) and their files."""

    through: int
    runs: list[Run]
    files: list[str]


class Checkpoints:
    """Steps 1–4 on a thread of its own while started; `newest` is step 5."""

    def __init__(
        self,
        directory: Path,
        con: duckdb.DuckDBPyConnection,
        dedupe: Dedupe,
        exclusive: threading.RLock,
        *,
        every_seconds: float = 10.0,
        every_keys: int = 300_000,
        found: Found | None = None,
    ) -> None:
        """`found`: the checkpoint the keys were loaded from (its runs are not written again)."""
        self._directory = directory
        self._con = con
        self._dedupe = dedupe
        self._exclusive = exclusive
        self._every_seconds = every_seconds
        self._every_keys = every_keys
        # The file of each run written, by its fingerprints' id (a weak reference tells a run
        # from a later one given the same id, and keeps no run a merge replaced alive).
        self._written: dict[int, tuple[weakref.ref[U64], str]] = {}
        if found is not None:
            for (fps, _), name in zip(found.runs, found.files, strict=True):
                self._written[id(fps)] = (weakref.ref(fps), name)
        self._taken_keys = -1  # keys held at the last checkpoint (-1: none taken yet)
        self._counted_from = 0  # keys held at the last checkpoint or at the start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)
        self.taken = 0

    def start(self) -> None:
        """Once the keys are loaded."""
        self._directory.mkdir(parents=True, exist_ok=True)
        self._counted_from = len(self._dedupe)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and take a last checkpoint (the flusher has stored everything)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.take()

    def _run(self) -> None:
        said_at = -math.inf
        due_at = time.monotonic() + self._every_seconds
        while not self._stop.wait(min(_POLL_SECONDS, self._every_seconds)):
            keys = len(self._dedupe)
            if keys - self._counted_from < self._every_keys and (
                time.monotonic() < due_at or keys == self._taken_keys
            ):
                continue
            due_at = time.monotonic() + self._every_seconds
            try:
                self.take()
            except Exception:  # the next one is due as usual; a start rebuilds what is missing
                self._counted_from = keys  # not tried again at every count
                if time.monotonic() - said_at >= 60:  # a full disk fails every one: once a minute
                    said_at = time.monotonic()
                    log.exception("a checkpoint failed; the next is due as usual")

    def take(self) -> Path:
        """One checkpoint (steps 2–4); its manifest."""
        with self._exclusive:  # step 2
            # fetchall: an open result would block this cursor's next statement.
            through = int(
                self._con.execute("SELECT coalesce(max(seq), 0) FROM all_events").fetchall()[0][0]
            )
            runs = self._dedupe.runs()
        written: dict[int, tuple[weakref.ref[U64], str]] = {}
        files = []
        for fps, seqs in runs:  # step 3
            known = self._written.get(id(fps))
            name = (
                known[1] if known is not None and known[0]() is fps else self._write_run(fps, seqs)
            )
            written[id(fps)] = (weakref.ref(fps), name)
            files.append({"file": name, "bytes": (self._directory / name).stat().st_size})
        self._written = written
        manifest = self._directory / _MANIFEST.format(self._next_number())  # step 4
        keys = sum(len(f) for f, _ in runs)
        body = {"through": through, "keys": keys, "runs": files}
        text = orjson.dumps(body, option=orjson.OPT_INDENT_2)
        _durably(manifest, lambda file: file.write(text))
        self._prune()
        self._taken_keys = self._counted_from = keys
        self.taken += 1
        return manifest

    def _write_run(self, fps: U64, seqs: I64) -> str:
        """A run as one `.npy` array of two rows (fingerprints, seqs as unsigned), written from
        the run's own memory (no copy of it made)."""
        name = _RUN.format(self._next_number())

        def write(file: BinaryIO) -> None:
            header = {"descr": "<u8", "fortran_order": False, "shape": (2, len(fps))}
            np.lib.format.write_array_header_2_0(file, header)
            file.write(np.ascontiguousarray(fps, "<u8").data)
            file.write(np.ascontiguousarray(seqs, "<i8").data)

        _durably(self._directory / name, write)
        return name

    def _next_number(self) -> int:
        numbers = [_number(p) for p in self._directory.iterdir()]
        return max((n for n in numbers if n is not None), default=0) + 1

    def _prune(self) -> None:
        manifests = _manifests(self._directory)
        kept = manifests[-KEPT:]
        named = {r["file"] for m in kept for r in _read(m).get("runs", [])}
        for path in self._directory.iterdir():
            if path in kept or path.name in named:
                continue
            with contextlib.suppress(OSError):
                path.unlink()


def newest(
    directory: Path, con: duckdb.DuckDBPyConnection, mapped_keys: int | None = None
) -> Found | None:
    """Step 5: the newest usable checkpoint in `directory`, or None; runs of at least
    `mapped_keys` keys are mapped from their files (None: none is)."""
    if not directory.is_dir():
        return None
    # Events deleted since (a shard's retention) leave their seqs in `seq_floor`.
    stored = int(
        con.execute(
            "SELECT greatest((SELECT coalesce(max(seq), 0) FROM all_events),"
            " (SELECT coalesce(max(seq), 0) FROM seq_floor))"
        ).fetchall()[0][0]
    )
    for manifest in reversed(_manifests(directory)):
        body = _read(manifest)
        try:
            through = int(body["through"])
            files = [(directory / r["file"], int(r["bytes"])) for r in body["runs"]]
        except (KeyError, TypeError, ValueError):
            log.warning("checkpoint %s is torn; trying the one before", manifest.name)
            continue
        if through > stored:
            log.warning(
                "checkpoint %s covers seqs up to %d, the database only %d: not used",
                manifest.name,
                through,
                stored,
            )
            continue
        runs = _runs(files, mapped_keys)
        if runs is None:
            log.warning("checkpoint %s lacks a file it names; trying the one before", manifest)
            continue
        return Found(through, runs, [path.name for path, _ in files])
    return None


def copy_newest(source: Path, target: Path, earlier: Path | None = None) -> bool:
    """The newest checkpoint in `source` (its manifest and runs) into `target`, linked where
    it can be (`segments.copy_files`; `earlier`: the checkpoints of a snapshot taken before);
    best effort: False, and nothing left in `target`, if one was pruned meanwhile (a start on
    the copy then reads every key from the events)."""
    manifests = _manifests(source) if source.is_dir() else []
    if not manifests:
        return False
    runs = [source / r["file"] for r in _read(manifests[-1]).get("runs", [])]
    try:
        copy_files([*runs, manifests[-1]], target, earlier)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        return False
    return True


def _runs(files: list[tuple[Path, int]], mapped_keys: int | None) -> list[Run] | None:
    """The runs in `files`, each checked against its size; None if one is not whole."""
    runs: list[Run] = []
    for path, size in files:
        try:
            if path.stat().st_size != size:
                return None
            both = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if both.ndim != 2 or both.shape[0] != 2 or both.dtype != np.uint64:
            return None
        if mapped_keys is None or both.shape[1] < mapped_keys:
            both = np.array(both)  # in memory, merged like any run
        runs.append((cast(U64, both[0]), cast(I64, both[1].view(np.int64))))
    return runs


def _manifests(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("checkpoint-"))


def _read(manifest: Path) -> dict[str, Any]:
    try:
        body = orjson.loads(manifest.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _number(path: Path) -> int | None:
    stem = path.name.split(".")[0]
    digits = stem.rpartition("-")[2]
    return int(digits) if digits.isdigit() else None


def _durably(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """The file `path` as `write` writes it, whole or not at all: written beside it, fsynced,
    renamed, and the folder fsynced."""
    partial = path.with_name("." + path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk is not made fuller
        raise
    fsync_directory(path.parent)
