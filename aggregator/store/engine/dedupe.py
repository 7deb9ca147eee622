"""Which events are new: every stored key, held as fingerprints.

An event's key is its (organization, external_id); an event without an external id that
another shard moved here is keyed by where it was first read (`ids.ORIGIN`), so that a row
moved twice (its shard crashed after moving it and before committing its batch) is applied
once; other events have no key. First write wins, forever (docs/internals/decisions.md,
decision 2). Asking DuckDB for every event
would cost a unique index (maintained on every insert and rewritten by checkpoints) or a scan;
instead each stored key is held here as a 64-bit fingerprint (DuckDB's `hash(organization_id,
external_id)`) with the seq of its event: 16 bytes a key, in sorted numpy runs merged like an LSM
tree (a run is merged into the one before it once it is at least half its size, so each key is
rewritten O(log n) times).

A fingerprint not held is a new key, for certain. A fingerprint held is only a candidate: the
event with the held seq is read back (from the events not yet flushed, else from DuckDB, by seq,
which the events table is ordered by) and the keys compared, so a collision can never drop an
event. Only true duplicates and collisions pay for that read.

Memory is bounded by `Spill`: a run that reaches its size is written to a file and searched
memory-mapped (the page cache holds what lookups touch), and never merged again. The files are
derived from the events table: emptied at every open, where the runs are read back from the
newest checkpoint (`checkpoints`) and only the keys stored after it from the events.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.settings import DEDUPE_MEMORY_KEYS
from aggregator.store.base import arrays
from aggregator.store.base.arrays import Column, numpy
from aggregator.store.base.rows import registered

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
# A key: (organization as its UUID's canonical text, external_id), or a moved row's origin
# (partition, offset, row: unique in the topic, whatever the organization).
Key = tuple[str, str] | tuple[int, int, int]
# {seq: key (None: the event has none)} of those of the given seqs that are in events not yet
# in DuckDB.
Unflushed = Callable[[I64], dict[int, Key | None]]
# The fingerprint of a key, as SQL over columns `organization_id` (text) and `external_id`, and
# of a moved row's origin. The organization is spelled as its UUID's canonical text on both
# sides (batches and the table).
FINGERPRINT = "hash(organization_id::UUID::VARCHAR, external_id)"
_MOVED = "hash(origin_partition, origin_offset, origin_row)"
_MOVED_KEY = ["origin_partition", "origin_offset", "origin_row"]
# Stores the origins of the moved rows without an external id among `{events}` (stored events
# with `ids.ORIGIN`), in the flush that stores them.
INSERT_MOVED = (
    "INSERT INTO moved_events SELECT seq, origin_partition, origin_offset, origin_row"
    " FROM {events} WHERE origin_moved AND external_id IS NULL"
)
# Bytes held per stored key: the fingerprint and the seq.
BYTES_PER_KEY = 16
# Keys held in memory before runs spill to files (1 GiB): the command line's default.
MEMORY_KEYS = DEDUPE_MEMORY_KEYS


@dataclass(frozen=True)
class Spill:
    """Runs of at least `keys` keys go to memory-mapped files in `directory`."""

    directory: Path
    keys: int


class Dedupe:
    """The set of stored keys. Mutated by the writer thread only (`add`, at commit); `keys`
    and the size are safe to read from anywhere."""

    def __init__(self, spill: Spill | None = None) -> None:
        self._runs: list[tuple[U64, I64]] = []
        self._lock = threading.Lock()
        self._compacting = threading.Lock()  # one merge at a time: each replaces what it read
        self._spill = spill
        self._files = itertools.count()

    def __len__(self) -> int:
        return sum(len(fps) for fps, _ in self._runs)

    @property
    def bytes(self) -> int:
        """Held in memory (spilled runs not counted)."""
        return sum(fps.nbytes + seqs.nbytes for fps, seqs in self._runs if not _spilled(fps))

    @property
    def spilled_bytes(self) -> int:
        return sum(fps.nbytes + seqs.nbytes for fps, seqs in self._runs if _spilled(fps))

    def load(
        self,
        con: duckdb.DuckDBPyConnection,
        runs: list[tuple[U64, I64]] | None = None,
        through: int = 0,
    ) -> None:
        """At open: `runs` (a checkpoint's, `checkpoints.newest`) and every key stored in the
        events table with a seq past `through`, read in runs of the spill size."""
        self.close()
        if self._spill is not None:
            self._spill.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._runs = list(runs or [])
        chunk = self._spill.keys if self._spill is not None else None
        reader = con.sql(
            f"SELECT {FINGERPRINT} AS fp, seq FROM all_events"  # noqa: S608 - fixed text, values bound
            f" WHERE external_id IS NOT NULL AND seq > {int(through)}"
            f" UNION ALL SELECT {_MOVED}, seq FROM moved_events WHERE seq > {int(through)}"
        ).to_arrow_reader(65_536)
        batches: list[pa.RecordBatch] = []
        rows = 0
        for batch in reader:
            batches.append(batch)
            rows += batch.num_rows
            if chunk is not None and rows >= chunk:
                self._load_run(batches)
                batches, rows = [], 0
        self._load_run(batches)

    def runs(self) -> list[tuple[U64, I64]]:
        """The runs held now (each sorted by fingerprint; runs never change: a merge makes a
        new one)."""
        with self._lock:
            return list(self._runs)

    def _load_run(self, batches: list[pa.RecordBatch]) -> None:
        if batches:
            table = pa.Table.from_batches(batches)
            self.add(_u64(table.column("fp")), _i64(table.column("seq")))
            self.compact()

    def close(self) -> None:
        """Drop every run and the spill files."""
        with self._lock:
            self._runs = []
        if self._spill is not None:
            shutil.rmtree(self._spill.directory, ignore_errors=True)

    def add(self, fingerprints: U64, seqs: I64) -> None:
        """Hold these keys (a new run; `compact` merges runs)."""
        if not len(fingerprints):
            return
        order = np.argsort(fingerprints, kind="stable")
        with self._lock:
            self._runs = [*self._runs, (fingerprints[order], seqs[order])]

    def compact(self) -> None:
        """Merge runs in memory until each is more than twice the size of the next, and spill
        those that reach the spill size (off the writer's thread: a merge of large runs takes
        a while; runs added meanwhile stay as they are)."""
        with self._compacting:
            self._compact()

    def _compact(self) -> None:
        runs = self._runs
        merged = list(runs)
        while (
            len(merged) > 1
            and not _spilled(merged[-2][0])
            and len(merged[-1][0]) * 2 >= len(merged[-2][0])
        ):
            merged[-2:] = [cast(tuple[U64, I64], arrays.merged(merged[-2], merged[-1]))]
        changed = len(merged) != len(runs)
        if self._spill is not None:
            for i, (fps, seqs) in enumerate(merged):
                if len(fps) >= self._spill.keys and not _spilled(fps):
                    merged[i] = self._to_files(fps, seqs)
                    changed = True
        if changed:
            with self._lock:
                self._runs = merged + self._runs[len(runs) :]

    def _to_files(self, fps: U64, seqs: I64) -> tuple[U64, I64]:
        assert self._spill is not None
        n = next(self._files)
        mapped = []
        for name, array in (("fp", fps), ("seq", seqs)):
            path = self._spill.directory / f"{n}.{name}.npy"
            np.save(path, array)
            mapped.append(np.load(path, mmap_mode="r"))
        return cast(U64, mapped[0]), cast(I64, mapped[1])

    def held(self, fingerprints: U64) -> tuple[I64, I64]:
        """(position in `fingerprints`, stored seq) of every held entry with one of these
        fingerprints (a fingerprint may be held more than once)."""
        by_value = np.argsort(fingerprints)
        ordered = fingerprints[by_value]  # sorted: each search below walks a run in order
        positions: list[I64] = []
        seqs: list[I64] = []
        for run, run_seqs in self._runs:
            wanted, order, at = ordered, by_value, np.searchsorted(run, ordered)
            # A fingerprint may be held more than once: walk right while it repeats.
            while len(at):
                hits = np.flatnonzero(at < len(run))
                hits = hits[run[at[hits]] == wanted[hits]]
                positions.append(order[hits].astype(np.int64))
                seqs.append(run_seqs[at[hits]])
                wanted, order, at = wanted[hits], order[hits], at[hits] + 1
        if not positions:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(positions), np.concatenate(seqs)


def new_rows(
    con: duckdb.DuckDBPyConnection,
    verify: duckdb.DuckDBPyConnection,
    batch: pa.Table,
    stores: list[Dedupe],
    unflushed: Unflushed,
) -> tuple[pa.BooleanArray, U64]:
    """Which rows of `batch` (organization_id, external_id and maybe `ids.ORIGIN`, in
    submission order) are new: no key, or the first of its key in the batch and not stored.
    Also the fingerprints of the batch's rows (0 where there is no key), to `add` the new ones.

    `stores` are searched for held keys (the committed set, and keys staged by the transaction
    in progress); candidates are read back from `unflushed` or, through `verify` (a cursor of
    its own, so that it sees every flush committed so far), from DuckDB. Keys are compared
    exactly only where fingerprints meet (duplicates, and collisions)."""
    n = batch.num_rows
    fps = fingerprinted(con, batch)
    keyed = is_keyed(batch)
    keyed_rows = np.flatnonzero(keyed)
    keys = _Keys(batch)
    first = _first_in_batch(keys, fps, keyed_rows)
    candidates = [store.held(fps[keyed_rows]) for store in stores]
    positions = keyed_rows[np.concatenate([c[0] for c in candidates])]
    stored = np.zeros(n, dtype=bool)
    if len(positions):
        seqs = np.concatenate([c[1] for c in candidates])
        stored[_confirmed(verify, keys, positions, seqs, unflushed)] = True
    keep = np.logical_or(~keyed, np.logical_and(first, ~stored))
    return pa.array(keep, pa.bool_()), fps


def is_keyed(events: pa.Table) -> npt.NDArray[np.bool_]:
    """Which rows of `events` have a key: an external id, or moved here by another shard."""
    keyed = numpy(pc.is_valid(events.column("external_id")), np.bool_)
    if "origin_moved" in events.column_names:
        moved: Column = events.column("origin_moved")
        keyed |= numpy(cast(Column, pc.fill_null(moved, pa.scalar(False))), np.bool_)
    return keyed


def fingerprinted(con: duckdb.DuckDBPyConnection, events: pa.Table) -> U64:
    """The fingerprint of each row's key (0 where it has none)."""
    columns, key = ["organization_id", "external_id"], FINGERPRINT
    if "origin_moved" in events.column_names:
        columns += [*_MOVED_KEY, "origin_moved"]
        key = f"CASE WHEN external_id IS NOT NULL THEN {key} WHEN origin_moved THEN {_MOVED} END"
    with registered(con, "_dedupe_batch", events.select(columns)):
        return _u64(
            con.sql(f"SELECT coalesce({key}, 0::UBIGINT) AS fp FROM _dedupe_batch")  # noqa: S608 - fixed text, values bound
            .to_arrow_table()
            .column("fp")
        )


def keys(events: pa.Table, rows: I64) -> list[Key | None]:
    """The keys of these rows of `events` (None: no key)."""
    return _Keys(events).of(rows)


class _Keys:
    """A batch's exact keys, read only for the rows that need them."""

    def __init__(self, batch: pa.Table) -> None:
        self._batch = batch
        self._canonical: dict[str, str] = {}

    def of(self, rows: I64) -> list[Key | None]:
        at = pa.array(rows, pa.int64())
        orgs = cast(list[str], self._batch.column("organization_id").take(at).to_pylist())
        ids = cast(list[str | None], self._batch.column("external_id").take(at).to_pylist())
        origins: list[tuple[int, int, int] | None] = [None] * len(ids)
        if "origin_moved" in self._batch.column_names:
            taken = self._batch.select([*_MOVED_KEY, "origin_moved"]).take(at).to_pylist()
            origins = [
                (r["origin_partition"], r["origin_offset"], r["origin_row"])
                if r["origin_moved"]
                else None
                for r in taken
            ]
        return [
            (self.canonical(o), e) if e is not None else origin
            for o, e, origin in zip(orgs, ids, origins, strict=True)
        ]

    def canonical(self, organization_id: str) -> str:
        found = self._canonical.get(organization_id)
        if found is None:
            found = self._canonical[organization_id] = str(uuid.UUID(organization_id))
        return found


def _first_in_batch(keys: _Keys, fps: U64, keyed_rows: I64) -> npt.NDArray[np.bool_]:
    """True for each keyed row that is the first of its key in the batch: by fingerprint, and
    where rows share one, by their keys."""
    first = np.zeros(len(fps), dtype=bool)
    order = keyed_rows[np.argsort(fps[keyed_rows], kind="stable")]  # stable: earliest first
    ordered = fps[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first[order[starts]] = True
    shared = ~starts
    shared[:-1] |= ~starts[1:]  # every row of a fingerprint that more than one row has
    rows = np.sort(order[shared])
    if len(rows):
        first[rows] = False
        seen: set[Key | None] = set()
        for row, key in zip(rows.tolist(), keys.of(rows), strict=True):
            if key not in seen:
                seen.add(key)
                first[row] = True
    return first


def _confirmed(
    verify: duckdb.DuckDBPyConnection,
    keys: _Keys,
    positions: I64,
    seqs: I64,
    unflushed: Unflushed,
) -> I64:
    """The positions whose key is the key of the event stored with the paired seq."""
    wanted = arrays.distinct(seqs)
    stored = unflushed(wanted)
    missing = [seq for seq in wanted.tolist() if seq not in stored]
    if missing:
        rows = verify.execute(
            "SELECT seq, organization_id::VARCHAR, external_id FROM all_events"
            " WHERE seq IN (SELECT unnest(?::BIGINT[])) AND external_id IS NOT NULL",
            [missing],
        ).fetchall()
        stored.update((seq, (keys.canonical(org), external_id)) for seq, org, external_id in rows)
        moved = verify.execute(
            "SELECT seq, origin_partition, origin_offset, origin_row FROM moved_events"
            " WHERE seq IN (SELECT unnest(?::BIGINT[]))",
            [missing],
        ).fetchall()
        stored.update((seq, (p, o, r)) for seq, p, o, r in moved)
    same = [
        key is not None and stored.get(seq) == key
        for seq, key in zip(seqs.tolist(), keys.of(positions), strict=True)
    ]
    kept: I64 = positions[np.array(same, dtype=bool)]
    return kept


def _spilled(array: U64) -> bool:
    return isinstance(array, np.memmap)


def _u64(column: Column) -> U64:
    return numpy(column, np.uint64)


def _i64(column: Column) -> I64:
    return numpy(column, np.int64)
