"""The store's in-memory half: which keys are stored, the balances, the applied batches on their
way to DuckDB, the seqs, and the features' own state (`Feature`).

Every writer transaction goes through one status (`Status`), each step checking it:

1. `begin` (IDLE -> OPEN): the features are told; nothing is staged.
2. Jobs run (OPEN): they change memory only through `stage` (an effect run after COMMIT),
   `log_requests` and `queue` (an applied batch), and read the state as it was before the
   transaction plus what the transaction itself recorded.
3. `prepare` (OPEN -> PREPARED): the transaction's ingest requests are appended to the log and
   made durable, just before DuckDB's COMMIT.
4. `commit` (PREPARED -> IDLE), after DuckDB's COMMIT: the staged effects run, in order (the
   balances, the stored keys, the memtable, the list of files), and the notices are sent; in a
   job's `hold`, before it ends, so that no flush, merge or lift reads the list of files
   between DuckDB's COMMIT and the list taking the change (it would list a file the job
   rewrote). Then, outside it, `room`: applying waits for the flusher to catch up.
   Or `rollback` (OPEN or PREPARED -> IDLE): what was staged is dropped, the log's append is
   undone, and the features forget what they read, so memory never holds what DuckDB (or the
   memtable, on its way there) will not.

Jobs other than applying events run with every applied batch stored first and the flusher held
off (`hold`): what they read and change in DuckDB is then the whole truth, in seq order.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from aggregator.store.base.arrays import numpy
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.engine import dedupe, ledger_log
from aggregator.store.engine.balances import Added, Balances, LedgerChange, Pending, Usage
from aggregator.store.engine.catalog import Catalog
from aggregator.store.engine.checkpoints import Found
from aggregator.store.engine.dedupe import Dedupe, Spill
from aggregator.store.engine.flusher import Flusher
from aggregator.store.engine.ingest_log import IngestLog, Logged
from aggregator.store.engine.memtable import (
    Applied,
    Memtable,
    Positions,
    keys_of,
    store,
    store_offsets,
    stored_events,
)
from aggregator.store.engine.segments import Change, Segments
from aggregator.store.metering import groups, partials
from aggregator.store.metering.groups import Bound
from aggregator.store.metering.rollups import Evaluated

Effect = Callable[[], object]
# Per organization, the customer meters a commit changed: (meter id, customer reference).
Changed = dict[str, set[tuple[str, str]]]
F = TypeVar("F", bound="Feature")


class Notices(Protocol):
    """What the store tells the rest of the process right after each commit, on the writer
    thread (each must be quick): which customer meters it changed, for the organizations
    someone `watched` (the live stream), and that webhook events are due (the sender)."""

    def watched(self) -> Collection[str]: ...
    def changed(self, changes: Changed) -> None: ...
    def webhooks_due(self) -> None: ...


class Feature:
    """State a feature keeps in memory beside the store (what it read once and keeps, what a
    transaction recorded), told how each transaction goes. Registered with `Live` at
    construction and found by its class (`Live.feature`); the defaults do nothing."""

    def begin(self) -> None:
        """A transaction starts."""

    def rollback(self) -> None:
        """The transaction rolled back: forget what it read or recorded."""

    def exclusive(self) -> None:
        """A job that may change any table runs next (under `Live.hold`)."""


class Status(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    PREPARED = "prepared"


class TransactionError(AssertionError):
    """A step taken in a status that does not allow it: a bug, never a rejection."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """A batch's new events: `keep` (per row of the batch), the new rows with their seqs
    (`events`, seqs from `first_seq` on), and the rows' fingerprints (0: no external_id)."""

    keep: pa.BooleanArray
    events: pa.Table
    first_seq: int
    fingerprints: dedupe.U64

    def seqs(self) -> dedupe.I64:
        """The seq each row of the batch took, -1 where it was left out."""
        kept = numpy(self.keep, np.bool_)
        seqs = np.full(len(kept), -1, np.int64)
        seqs[kept] = np.arange(self.first_seq, self.first_seq + int(kept.sum()), dtype=np.int64)
        return seqs


class SequenceCounter:
    """Ingestion order numbers; only the writer thread draws from it."""

    def __init__(self, start: int) -> None:
        self._next = start

    @property
    def last(self) -> int:
        """The last seq drawn (0: none)."""
        return self._next - 1

    def reserve(self, n: int) -> int:
        """The first of `n` consecutive seqs."""
        first, self._next = self._next, self._next + n
        return first

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection, logged: list[Logged]) -> SequenceCounter:
        """After every stored event's seq and every seq the ingest log's requests took."""
        # fetchall() closes the result: an open result set blocks DuckDB's checkpoints.
        rows = con.execute(
            "SELECT greatest((SELECT coalesce(max(seq), 0) FROM all_events),"
            " (SELECT coalesce(max(seq), 0) FROM seq_floor))"
        ).fetchall()
        return cls(max([int(rows[0][0]), *(r.last_seq for r in logged)]) + 1)


class Live:
    def __init__(
        self,
        seq: SequenceCounter,
        flusher: Flusher,
        memtable: Memtable,
        log: IngestLog,
        verify: duckdb.DuckDBPyConnection,
        segments: Segments,
        balances: Balances,
        *,
        notices: Notices,
        features: Sequence[Feature] = (),
        max_pending_events: int,
        spill: Spill | None = None,
        bound: Bound,
    ) -> None:
        self.seq = seq
        # The bound on a dimension's values per meter, customer reference and bucket that jobs
        # writing rollups apply (`partials.partials`).
        self.bound = bound
        self.flusher = flusher
        self.memtable = memtable
        self.log = log
        self.segments = segments
        self.dedupe = Dedupe(spill)
        self.balances = balances
        self.catalog = Catalog()
        self._notices = notices
        self._features: dict[type[Feature], Feature] = {type(f): f for f in features}
        self._changed: Changed = {}
        self._verify = verify
        self._max_pending = max_pending_events
        # The next offset applied per (topic, partition), stored or not: what a consumed batch
        # must start at (memory, so that a flush in between cannot hide it from the check).
        self._offsets: dict[tuple[str, int], int] = {}
        self._status = Status.IDLE
        self._staged: list[Effect] = []
        self._ledger = Pending(self.balances)
        self._staged_keys = Dedupe()
        self._staged_entries: list[Applied] = []
        self._staged_log: list[Logged] = []
        self._staged_segments: list[Change] = []
        # System events the transaction made, stored together before it commits (`prepare`).
        self._staged_system: list[pa.Table] = []
        self._system_con: duckdb.DuckDBPyConnection | None = None
        self._voiding = False  # events voided in this transaction (`void`)
        self._logged_at: tuple[int, int, int] | None = None  # where the log ended before
        self._applied_through = 0  # the last seq applied: each batch's come after it

    def feature(self, kind: type[F]) -> F:
        """The registered state of a feature (`Feature`), by its class."""
        found = self._features[kind]
        assert isinstance(found, kind)
        return found

    def compact(self) -> None:
        """Merge the sorted runs of the sets held (off the writer's thread)."""
        self.dedupe.compact()
        self.balances.compact()

    def close(self) -> None:
        self.dedupe.close()

    def load(self, con: duckdb.DuckDBPyConnection, keys: Found | None = None) -> None:
        """What memory holds, read at open; the dedupe keys from the checkpoint `keys` and the
        events stored after it."""
        if keys is None:
            self.dedupe.load(con)
        else:
            self.dedupe.load(con, keys.runs, keys.through)
        ledger_log.load(con, self.balances, self.segments)
        self.balances.load_credits(con)
        self.catalog.load(con)
        self.memtable.load_first_times(con)
        rows = con.execute("SELECT topic, partition, next_offset FROM kafka_offsets").fetchall()
        self._offsets = {(str(t), int(p)): int(o) for t, p, o in rows}
        # Stored events' seqs (the ingest log's requests not yet stored are applied again).
        stored = con.execute("SELECT coalesce(max(seq), 0) FROM all_events").fetchall()
        self._applied_through = int(stored[0][0])

    # ---- the writer's transaction steps (writer thread) -----------------------------------

    def _expect(self, *allowed: Status) -> None:
        if self._status not in allowed:
            raise TransactionError(f"{self._status.value}, not {[s.value for s in allowed]}")

    def begin(self) -> None:
        """Step 1."""
        self._expect(Status.IDLE)
        self._status = Status.OPEN
        self._reset()
        self._changed = {}
        for feature in self._features.values():
            feature.begin()

    def prepare(self) -> None:
        """Step 3: just before COMMIT, the transaction's system events stored (one file for
        all of them: a plan catching up makes hundreds in a job) and its ingest requests made
        durable (the log)."""
        self._expect(Status.OPEN)
        if self._staged_system:
            assert self._system_con is not None
            # A file and its listing only: no parent, origin, subject's first time, meter or
            # key of a system event is kept (the flush path's `store` does those for events).
            events = stored_events(pa.concat_tables(self._staged_system))
            self.change_segments(
                self._system_con, Change(self.segments.write_all([("events", events)]))
            )
        if self._staged_log:
            if self.flusher.disk_full:
                # Refused as the log itself would be when full: taken on, these events would
                # pile up unstored, more than the WAL may hold once space is freed.
                raise OSError(errno.ENOSPC, "No space left on device to store applied events")
            self._logged_at = self.log.append(self._staged_log)
        self._status = Status.PREPARED

    def commit(self) -> None:
        """Step 4, after DuckDB's COMMIT."""
        self._expect(Status.PREPARED)
        staged = self._staged
        self._reset()
        self._status = Status.IDLE
        with self.balances.lock:
            for effect in staged:
                effect()
        self.flusher.poke()
        self._announce()

    def room(self) -> None:
        """After `commit`, outside `hold`: applying may not run further ahead of storing than
        `max_pending_events` (backpressure)."""
        while self.memtable.events > self._max_pending:
            self.flusher.poke()
            time.sleep(0.002)

    def rollback(self) -> None:
        """Step 4, when DuckDB's COMMIT (or anything before it) failed."""
        self._expect(Status.OPEN, Status.PREPARED)
        if self._logged_at is not None:  # logged, then DuckDB's COMMIT failed
            self.log.undo(self._logged_at)
        for change in self._staged_segments:
            self.segments.abandon(change)
        if self._voiding:
            self.segments.abandon_void()
        self._reset()
        self._changed = {}
        self._status = Status.IDLE
        self.catalog.forget_meters()  # a meter this transaction changed, read within it
        for feature in self._features.values():
            feature.rollback()

    def repaired(self) -> None:
        """A meter marked failed (`MeterUnevaluable.repair`): read anew."""
        self.catalog.forget_meters()

    def _reset(self) -> None:
        self._staged = []
        self._ledger = Pending(self.balances)
        self._staged_keys = Dedupe()
        self._staged_entries = []
        self._staged_log = []
        self._staged_segments = []
        self._staged_system = []
        self._system_con = None
        self._voiding = False
        self._logged_at = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Every applied batch stored, and the flusher held off, for as long as this lasts."""
        for feature in self._features.values():
            feature.exclusive()
        with self.flusher.exclusive:
            self.flusher.flush_all()
            yield

    # ---- for jobs, inside their transaction (writer thread) -------------------------------

    def stage(self, effect: Effect) -> None:
        """Run `effect` once the transaction commits."""
        self._expect(Status.OPEN)
        self._staged.append(effect)

    def change_ledger(self, con: duckdb.DuckDBPyConnection, change: LedgerChange) -> None:
        """A change of the balances other than usage added (`add_ledger_usage`) this
        transaction makes: listed in it on `con` (`ledger_log.record`), read back within it
        (`ledger_usage`), applied at its commit in order with its other effects."""
        self._expect(Status.OPEN)
        ledger_log.record(con, change, self.segments.last_number)
        self._recorded(change)

    def add_ledger_usage(self, con: duckdb.DuckDBPyConnection, added: Sequence[Added]) -> None:
        """Usage this transaction adds (one source's), as `change_ledger` takes the other
        changes: written as one set of files (`ledger_log.files_of`; only under `hold`)."""
        self._expect(Status.OPEN)
        files = ledger_log.files_of(con, added)
        if files:
            self.change_segments(con, Change(self.segments.write_all(files)))
        for change in added:
            self._recorded(change)

    def _recorded(self, change: LedgerChange) -> None:
        self._ledger.record(change)
        self.stage(lambda: self.balances.apply(change))

    def ledger_usage(self, meter: MeterRow, subjects: list[str]) -> Usage:
        """The usage of `meter` by the customer references `subjects` as this transaction has
        it so far (its batches of ingest aside: no job reads those back): the balances with the
        changes it made (`change_ledger`)."""
        return self._ledger.usage(meter, subjects)

    def change_segments(self, con: duckdb.DuckDBPyConnection, change: Change) -> None:
        """List `change` (files written by the job: `Segments.write`, `Segments.rewrite`) in
        this transaction; the list takes it at commit, its files are deleted at rollback. Only
        under `hold`: no flush or merge changes the list meanwhile."""
        self._expect(Status.OPEN)
        self._staged_segments.append(change)
        self.segments.commit(con, change, self._within())
        self.stage(lambda: self.segments.committed(change))

    def store_contributions(
        self, con: duckdb.DuckDBPyConnection, evaluated: Sequence[Evaluated]
    ) -> None:
        """Contributions a job evaluated itself (a backfill's chunk), stored in its transaction
        as a flush stores applied events' (`memtable.store`): the rollups' partials as files
        listed here (`change_segments`: only under `hold`), the ledger's usage."""
        found = partials.partials(con, evaluated, self.bound)
        groups.list_folded(con, found["rollup_groups"])
        written = [self.segments.write(r, rows) for r, rows in found.items() if rows.num_rows]
        self.change_segments(con, Change(written))
        self.add_ledger_usage(con, [Added.of(ev) for ev in evaluated])

    def _within(self) -> Change:
        """Every change of the files this transaction made so far: what its later changes,
        and the views it defines, start from (the list takes them only at commit)."""
        whole = Change()
        for change in self._staged_segments:
            whole = whole.then(change)
        return whole

    def void(self, con: duckdb.DuckDBPyConnection, seqs: npt.NDArray[np.int64]) -> None:
        """Events voided in this transaction (their rows in `voided_events` already): the
        `events` view leaves them out from now on (`Segments.void`). Only under `hold`."""
        self._expect(Status.OPEN)
        self._voiding = True
        self.segments.void(con, seqs, self._within())
        self.stage(self.segments.voided)

    def store_rows(
        self, con: duckdb.DuckDBPyConnection, relation: str, rows: pa.Table, *, level: int = 0
    ) -> None:
        """Rows a job adds to a relation kept as segments (`segments.RELATIONS`: its columns,
        in its order), stored as a file of their own (of `level`) in this transaction, as a
        flush stores applied events' (under `hold`, as `change_segments`). New events go
        through `store_events`."""
        if rows.num_rows:
            self.change_segments(con, Change([self.segments.write(relation, rows, level)]))

    def store_system_event(self, con: duckdb.DuckDBPyConnection, event: pa.Table) -> None:
        """A system event the job made (`store_events`' columns, with its `id`), stored with
        the transaction's others just before it commits: no read in a job asks for one. Only
        under `hold`."""
        self._expect(Status.OPEN)
        self._staged_system.append(event)
        self._system_con = con

    def delete_rows(
        self,
        con: duckdb.DuckDBPyConnection,
        relation: str,
        where: str,
        params: list[object],
        *,
        lifted: bool = False,
    ) -> None:
        """Delete the rows of a relation kept as segments that `where` matches (of its
        `LIFTED` files alone where `lifted`): those files written again without them, in this
        transaction (under `hold`, as `change_segments`)."""
        within = self._within()
        rewritten = self.segments.rewrite(con, relation, where, params, within, lifted=lifted)
        self.change_segments(con, rewritten)

    def webhooks_due(self) -> None:
        """The transaction wrote webhook events: the sender is told once it commits."""
        self.stage(self._notices.webhooks_due)

    def log_requests(self, requests: list[Logged]) -> None:
        """Append accepted ingest requests to the ingest log when the transaction commits
        (before it does: `prepare`)."""
        self._expect(Status.OPEN)
        self._staged_log += requests

    def admit(self, con: duckdb.DuckDBPyConnection, batch: pa.Table) -> Admitted:
        """The new events of `batch` (`Applied.events`' columns but seq, in order), with the
        seqs they take."""
        self._expect(Status.OPEN)
        keep, fingerprints = dedupe.new_rows(
            con, self._verify, batch, [self.dedupe, self._staged_keys], self._unflushed
        )
        mask = numpy(keep, np.bool_)
        new = batch if mask.all() else batch.filter(keep)
        first = self.seq.reserve(new.num_rows)
        seqs = np.arange(first, first + new.num_rows, dtype=np.int64)
        events = new.append_column("seq", pa.array(seqs))
        return Admitted(keep, events, first, fingerprints[mask])

    def applied_offsets(self, topic: str) -> dict[int, int]:
        """The next offset of each partition of `topic` as applied so far, stored or not (this
        transaction's batches too, when called from the writer thread inside one)."""
        offsets = {p: o for (t, p), o in self._offsets.items() if t == topic}
        for entry in self._staged_entries:
            offsets.update((p, o) for t, p, o in entry.offsets if t == topic)
        return offsets

    def committed_offsets(self, topic: str) -> dict[int, int]:
        """The next offset of each partition of `topic` as committed so far (what any thread
        may read: a batch in a transaction not yet committed is not there)."""
        return {p: o for (t, p), o in list(self._offsets.items()) if t == topic}

    def set_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        """A job changed the stored offsets themselves (a reset, a partition's start): held
        from its commit on."""

        def held() -> None:
            self._offsets.update(((topic, p), o) for p, o in offsets.items())

        self.stage(held)

    def _unflushed(self, seqs: dedupe.I64) -> dict[int, dedupe.Key | None]:
        return keys_of(self.memtable.take() + self._staged_entries, seqs)

    def queue(
        self,
        con: duckdb.DuckDBPyConnection,
        events: pa.Table,
        evaluated: Sequence[Evaluated],
        *,
        fingerprints: dedupe.U64 | None = None,
        offsets: Positions = (),
        log_id: int | None = None,
    ) -> None:
        """An applied batch of new `events` (`Applied.events`' columns) with its meters'
        contributions: its keys held at once for this transaction's later batches, and at
        commit the balances, the stored keys and the memtable take it. `fingerprints` of the
        rows (`Admitted`'s), if known."""
        self._expect(Status.OPEN)
        entry = Applied(events, tuple(evaluated), offsets, log_id)
        keyed = dedupe.is_keyed(events)
        if fingerprints is None:
            fingerprints = dedupe.fingerprinted(con, events)
        held, seqs = fingerprints[keyed], numpy(events.column("seq"), np.int64)[keyed]
        self._staged_keys.add(held, seqs)
        self._staged_entries.append(entry)
        self.stage(lambda: self._applied(entry, held, seqs))

    def store_events(self, con: duckdb.DuckDBPyConnection, events: pa.Table, keyed: bool) -> None:
        """New events a job applies (`Applied.events`' columns, with seqs it reserved), stored in
        its transaction: a correction's, whose write record is their only log, so they never
        wait in the memtable. Their keys are held at commit where `keyed` (an amended event's
        new version shares its external id with the version it voids, whose key is held).
        What they contribute to rollups and the ledger is the job's to store. Only under
        `hold`."""
        self._expect(Status.OPEN)
        _, change = store(con, [Applied(events)], self.segments, self.bound, self._within())
        self._staged_segments.append(change)
        held, seqs = np.empty(0, np.uint64), np.empty(0, np.int64)
        if keyed:
            mask = dedupe.is_keyed(events)
            held = dedupe.fingerprinted(con, events)[mask]
            seqs = numpy(events.column("seq"), np.int64)[mask]
            self._staged_keys.add(held, seqs)
        last = int(events.column("seq")[-1].as_py()) if events.num_rows else 0

        def stored() -> None:
            self.segments.committed(change)
            self.dedupe.add(held, seqs)
            self._applied_through = max(self._applied_through, last)

        self.stage(stored)

    def advance(self, con: duckdb.DuckDBPyConnection, offsets: Positions) -> None:
        """Positions that no events come with (the journal's, after a group of API writes), so
        stored that a position stored never runs ahead of what is stored: in this transaction
        when every event applied before it is stored (a memtable entry would make the next
        write that waits for pending events flush first), else with those events, by the same
        flush."""
        self._expect(Status.OPEN)
        if self.memtable.added == self.memtable.stored and not self._staged_entries:
            store_offsets(con, offsets)
            self.stage(lambda: self._offsets.update(((t, p), o) for t, p, o in offsets))
            return
        entry = Applied(pa.table({"seq": pa.array([], pa.int64())}), (), offsets)
        self._staged_entries.append(entry)
        none = np.empty(0, np.uint64), np.empty(0, np.int64)
        self.stage(lambda: self._applied(entry, *none))

    def _applied(self, entry: Applied, fingerprints: np.ndarray, seqs: np.ndarray) -> None:
        if entry.events.num_rows:
            # A batch is applied once: its seqs were drawn after every batch applied before.
            first = int(entry.events.column("seq")[0].as_py())
            assert first > self._applied_through, f"seq {first} applied again"
            self._applied_through = first + entry.events.num_rows - 1
        for topic, partition, offset in entry.offsets:
            # ... and a partition's offsets only move forward.
            assert offset >= self._offsets.get((topic, partition), 0), (topic, partition)
        self.dedupe.add(fingerprints, seqs)
        for ev in entry.evaluated:
            self.add_usage(ev)
        self.memtable.add(entry)
        # Last: a reader that sees the offsets (`committed_offsets`) finds the events in the
        # memtable, so a read's wait for them to be stored (the flusher's barrier) covers them.
        self._offsets.update(((t, p), o) for t, p, o in entry.offsets)

    def add_usage(self, evaluated: Evaluated) -> None:
        """Fold a batch's ledger usage into the balances (at commit)."""
        self.balances.apply(Added.of(evaluated))
        org = evaluated.organization_id
        if org in self._notices.watched():
            pairs = self._changed.setdefault(org, set())
            for table in (evaluated.ledger, evaluated.ledger_values):
                meters, names = table.column("meter_id"), table.column("subject")
                pairs.update(
                    zip(map(str, meters.to_pylist()), map(str, names.to_pylist()), strict=True)
                )

    def changed(self, organization_id: str, meter_id: str, subject: str) -> None:
        """A customer meter this transaction changed other than by usage (a credit, a reset):
        announced with the commit to those watching its organization."""
        self._expect(Status.OPEN)
        if organization_id in self._notices.watched():
            self._changed.setdefault(organization_id, set()).add((meter_id, subject))

    def _announce(self) -> None:
        """Tell the notices what this commit changed: usage as it was folded in (`add_usage`),
        and the changes jobs recorded (`changed`)."""
        if self._changed:
            changed, self._changed = self._changed, {}
            self._notices.changed(changed)
