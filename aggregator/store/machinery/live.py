"""The store's in-memory half: which keys are stored, the balances, the applied batches on their
way to DuckDB, and the seqs.

Writer jobs change it only through `stage`, inside their transaction: the writer runs the staged
effects after COMMIT, in order, and drops them on ROLLBACK, so memory never holds what DuckDB (or
the memtable, on its way there) will not. Jobs other than applying events run with every
applied batch stored first and the flusher held off (`hold`): what they read and change in
DuckDB is then the whole truth, in seq order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base import subjects
from aggregator.store.base.arrays import numpy
from aggregator.store.base.rows import registered
from aggregator.store.machinery import dedupe, rollups
from aggregator.store.machinery.balances import Balances
from aggregator.store.machinery.catalog import Catalog
from aggregator.store.machinery.dedupe import Dedupe, Spill
from aggregator.store.machinery.flusher import Flusher
from aggregator.store.machinery.ingest_log import IngestLog, Logged
from aggregator.store.machinery.memtable import Applied, Memtable, keys_of
from aggregator.store.machinery.rollups import Evaluated, Prepared
from aggregator.store.tables import alert_tables, hold_tables, webhook_tables
from aggregator.store.tables.meter_tables import MeterRow, apply_isolated, meters_of
from meters.times import now_us

Effect = Callable[[], object]
# Per organization, the customer meters a commit changed: (meter id, customer reference).
Changed = dict[str, set[tuple[str, str]]]


class Changes(Protocol):
    """Who is told, right after each commit, which customer meters it changed (the live
    stream's feed). Both are called on the writer thread, so both must be quick."""

    def watched(self) -> Collection[str]:
        """The organizations someone listens to now (changes of others are not gathered)."""
        ...

    def changed(self, changes: Changed) -> None: ...


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

    def reserve(self, n: int) -> int:
        """The first of `n` consecutive seqs."""
        first, self._next = self._next, self._next + n
        return first

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection, logged: list[Logged]) -> SequenceCounter:
        """After every stored event's seq and every seq the ingest log's requests took."""
        # fetchall() closes the result: an open result set blocks DuckDB's checkpoints.
        rows = con.execute("SELECT coalesce(max(seq), 0) FROM events").fetchall()
        return cls(max([int(rows[0][0]), *(r.last_seq for r in logged)]) + 1)


class Live:
    def __init__(
        self,
        seq: SequenceCounter,
        flusher: Flusher,
        memtable: Memtable,
        log: IngestLog,
        verify: duckdb.DuckDBPyConnection,
        *,
        max_pending_events: int,
        spill: Spill | None = None,
    ) -> None:
        self.seq = seq
        self.flusher = flusher
        self.memtable = memtable
        self.log = log
        self.dedupe = Dedupe(spill)
        self.balances = Balances()
        self.catalog = Catalog()
        # External ids of holds that may be active, per organization (`hold_tables`).
        self.hold_keys: dict[str, set[str]] = {}
        # Wakes the webhook sender once a transaction that wrote webhook events commits.
        self.notify_webhooks: Effect = lambda: None
        # Alerts per organization (read when first needed), the customer meters this
        # transaction changed as it left them, and how a `meter.alert` event's data is made.
        self.alerts: dict[str, alert_tables.Watch] = {}
        self.alert_values: dict[tuple[str, str], alert_tables.Value] = {}
        self.alert_payload: alert_tables.Payload = alert_tables.basic_payload
        # Whether an organization has an endpoint for customer.state_changed (`webhook_tables`).
        self.state_subscribers: dict[str, bool] = {}
        # Told what each commit changed in customer meters, when someone listens (`Changes`).
        self.changes: Changes | None = None
        self._changed: Changed = {}
        self._meter_organizations: dict[str, str] = {}  # a meter's never changes
        self._verify = verify
        self._max_pending = max_pending_events
        # The next offset applied per (topic, partition), stored or not: what a consumed batch
        # must start at (memory, so that a flush in between cannot hide it from the check).
        self._offsets: dict[tuple[str, int], int] = {}
        self._staged: list[Effect] = []
        self._staged_keys = Dedupe()
        self._staged_entries: list[Applied] = []
        self._staged_log: list[Logged] = []
        self._logged_at: tuple[int, int, int] | None = None  # where the log ended before
        # Each organization's live meters, read once, dropped when a job that may change them
        # runs (such a job starts a group of its own, under `hold`) or a transaction rolls back
        # (a repair marks meters failed between the two): an ingest transaction then reads no
        # DuckDB table, and so never waits out a checkpoint.
        self._meters: dict[str, list[MeterRow]] = {}

    def compact(self) -> None:
        """Merge the sorted runs of the sets held (off the writer's thread)."""
        self.dedupe.compact()
        self.balances.compact()

    def close(self) -> None:
        self.dedupe.close()

    def known_meters(self, organization_id: str) -> list[MeterRow] | None:
        """The organization's meters as the next transaction applying its events would read
        them, if read already (from any thread: to evaluate events before the writer)."""
        return self._meters.get(organization_id)

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        self.dedupe.load(con)
        self.balances.load(con)
        self.catalog.load(con)
        self.hold_keys = hold_tables.active_keys(con, now_us())
        rows = con.execute("SELECT topic, partition, next_offset FROM kafka_offsets").fetchall()
        self._offsets = {(str(t), int(p)): int(o) for t, p, o in rows}

    # ---- the writer's transaction hooks (writer thread) -----------------------------------

    def begin(self) -> None:
        self.alert_values = {}
        self._changed = {}
        self._staged = []
        self._staged_keys = Dedupe()
        self._staged_entries = []
        self._staged_log = []
        self._logged_at = None

    def prepare(self) -> None:
        """Just before COMMIT: the transaction's ingest requests made durable (the log)."""
        if self._staged_log:
            self._logged_at = self.log.append(self._staged_log)

    def commit(self) -> None:
        staged, self._staged = self._staged, []
        self._staged_keys = Dedupe()
        self._staged_entries = []
        self._staged_log = []
        self._logged_at = None
        with self.balances.lock:
            for effect in staged:
                effect()
        self.flusher.poke()
        self._announce()
        # Backpressure: applying may not run further ahead of storing than this.
        while self.memtable.events > self._max_pending:
            self.flusher.poke()
            time.sleep(0.002)

    def rollback(self) -> None:
        self._meters.clear()
        self.alerts.clear()
        self.state_subscribers.clear()
        if self._logged_at is not None:  # logged, then DuckDB's COMMIT failed
            self.log.undo(self._logged_at)
        self.begin()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Every applied batch stored, and the flusher held off, for as long as this lasts."""
        self._meters.clear()
        with self.flusher.exclusive:
            self.flusher.flush_all()
            yield

    # ---- for jobs, inside their transaction (writer thread) -------------------------------

    def stage(self, effect: Effect) -> None:
        """Run `effect` once the transaction commits."""
        self._staged.append(effect)

    def log_requests(self, requests: list[Logged]) -> None:
        """Append accepted ingest requests to the ingest log when the transaction commits
        (before it does: `prepare`)."""
        self._staged_log += requests

    def admit(self, con: duckdb.DuckDBPyConnection, batch: pa.Table) -> Admitted:
        """The new events of `batch` (`Applied.events`' columns but seq, in order), with the
        seqs they take."""
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

    def set_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        """A job changed the stored offsets themselves (a reset, a partition's start): held
        from its commit on."""

        def held() -> None:
            self._offsets.update(((topic, p), o) for p, o in offsets.items())

        self.stage(held)

    def _unflushed(self, seqs: dedupe.I64) -> dict[int, tuple[str, str]]:
        return keys_of(self.memtable.take() + self._staged_entries, seqs)

    def apply(
        self,
        con: duckdb.DuckDBPyConnection,
        events: pa.Table,
        *,
        fingerprints: dedupe.U64 | None = None,
        offsets: tuple[tuple[str, int, int], ...] = (),
        log_id: int | None = None,
        prepared: Mapping[str, Prepared] | None = None,
    ) -> None:
        """Apply new `events` (`Applied.events`' columns): every meter of their organizations
        evaluated now (or before, where `prepared` has an organization's events evaluated for
        its meters as they are), the balances and the stored keys updated at commit, the batch
        queued to be stored. `fingerprints` of the rows (`Admitted`'s), if known."""
        at_us = now_us()
        evaluated: list[Evaluated] = []
        organizations = pc.unique(events.column("organization_id")).to_pylist()
        with registered(con, "_batch_new", events):
            for organization in map(str, organizations):
                meters = self._meters.get(organization)
                if meters is None:
                    meters = self._meters[organization] = meters_of(con, [organization])
                if not meters:
                    continue
                ready = (prepared or {}).get(organization)
                values = None if ready is None else ready.columns_for(meters)
                if values is not None:
                    evaluated.append(rollups.evaluated(meters, values, at_us=at_us))
                    continue
                evaluated.append(
                    apply_isolated(
                        con,
                        meters,
                        "_batch_new",
                        "organization_id = ?",
                        [organization],
                        data=events,
                        at_us=at_us,
                    )
                )
            orgs = {o: self._meters[o] for o in map(str, organizations) if self._meters.get(o)}
            hold_tables.settle(con, self, "_batch_new", events, orgs, at_us)
        for ev in evaluated:
            alert_tables.on_usage(con, self, ev)
            self._state_changed(con, ev, at_us)
        entry = Applied(events, tuple(evaluated), offsets, log_id)
        keyed = pc.is_valid(events.column("external_id"))
        if fingerprints is None:
            held, seqs = dedupe.fingerprints(con, events.filter(keyed))
        else:
            mask = numpy(keyed, np.bool_)
            held, seqs = fingerprints[mask], numpy(events.column("seq"), np.int64)[mask]
        self._staged_keys.add(held, seqs)
        self._staged_entries.append(entry)
        self.stage(lambda: self._applied(entry, held, seqs))

    def _state_changed(self, con: duckdb.DuckDBPyConnection, ev: Evaluated, at_us: int) -> None:
        """Mark the customers whose meters the batch changed (customer.state_changed)."""
        org = ev.organization_id
        if not webhook_tables.subscribes(con, self, org):
            return
        names = set(ev.ledger.column("subject").to_pylist())
        names |= set(ev.ledger_values.column("subject").to_pylist())
        found = self.catalog.customers_of_subjects(con, org, sorted(map(str, names)))
        customers = sorted({c.id for c in found.values()})
        webhook_tables.mark_state_changed(con, self, org, customers, at_us)

    def _applied(self, entry: Applied, fingerprints: np.ndarray, seqs: np.ndarray) -> None:
        self.dedupe.add(fingerprints, seqs)
        self._offsets.update(((t, p), o) for t, p, o in entry.offsets)
        for ev in entry.evaluated:
            self.add_usage(ev)
        self.memtable.add(entry)

    def add_usage(self, evaluated: Evaluated) -> None:
        """Fold a batch's ledger usage into the balances (at commit)."""
        n = evaluated.ledger.num_rows
        at = pa.array(np.full(n, evaluated.at_us, dtype=np.int64))
        numbers = evaluated.ledger.append_column("first_us", at).append_column("last_us", at)
        self.balances.add(evaluated.organization_id, numbers, evaluated.ledger_values)
        org = evaluated.organization_id
        if self.changes is not None and org in self.changes.watched():
            pairs = self._changed.setdefault(org, set())
            for table in (evaluated.ledger, evaluated.ledger_values):
                meters, names = table.column("meter_id"), table.column("subject")
                pairs.update(
                    zip(map(str, meters.to_pylist()), map(str, names.to_pylist()), strict=True)
                )

    def _announce(self) -> None:
        """Tell `changes` what this commit changed: usage as it was folded in (`add_usage`),
        credits and resets from `alert_values`, where each records its customer meter
        (`alert_tables`), keyed by meter and customer id without the organization."""
        changes = self.changes
        if changes is None:
            return
        watched = changes.watched()
        if watched and self.alert_values:
            orgs = self._organizations_of({meter for meter, _ in self.alert_values})
            for meter, customer in self.alert_values:
                org = orgs.get(meter)
                if org is not None and org in watched:
                    self._changed.setdefault(org, set()).add((meter, subjects.of_id(customer)))
        if self._changed:
            changed, self._changed = self._changed, {}
            changes.changed(changed)

    def _organizations_of(self, meters: set[str]) -> dict[str, str]:
        known = self._meter_organizations
        missing = sorted(meters - known.keys())
        if missing:
            known.update(
                self._verify.execute(
                    "SELECT id::VARCHAR, organization_id::VARCHAR FROM meters"
                    " WHERE id IN (SELECT unnest(?::UUID[]))",
                    [missing],
                ).fetchall()
            )
        return known
