"""SQL for holds: units of a customer meter's balance reserved before they are spent.

A hold is decided in the writer (`create_job`) from memory: the balance (`Balances`) and the
active holds, those of its own transaction included (`HoldKeys`), so holds committed together
can never reserve more than the balance; it answers what it decided, read from nothing after
(`Created`). It ends
when the usage event with the same `external_id`, customer and meter is applied (`settle`, in
that event's transaction: its consumption replaces the hold), when it is released, or when it
expires (`expires_at` passed: nothing is written, every read takes the time into account).

`HoldKeys` holds, per organization, the external ids of holds that may be active: a
superset (a key is added when a hold's job runs, removed when its end commits), so that
ingest looks for holds to settle only in batches naming one. `meter_holds` stays the record
a restart loads them from, and the list the API pages through.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import InsufficientBalance, NotFound
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import first_row
from aggregator.store.engine.live import Feature, Live
from aggregator.store.engine.writer import Job, Tx, independent
from aggregator.store.metering.meter_sql import meter_events_sql
from aggregator.store.tables import idempotency, quotas
from aggregator.store.tables.customer_tables import CustomerRow, first_event_us, get_customer
from aggregator.store.tables.ledger_reads import CustomerMeter, held_customer_meter
from aggregator.store.tables.ledger_tables import kept, resolve
from aggregator.store.tables.quotas import TenantLimits
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import HOLDABLE, HoldCreate

__all__ = [
    "Created",
    "HoldRow",
    "Status",
    "create_job",
    "get_hold",
    "held",
    "held_by_pair",
    "held_in_memory",
    "list_holds",
    "release_job",
]

Con = duckdb.DuckDBPyConnection
Stored = Literal["active", "settled", "released"]
Status = Literal["active", "settled", "released", "expired"]
_US = 1_000_000
# How long an expired hold stays in memory (`HoldKeys`): longer than any two records' clocks differ.
KEPT_EXPIRED_US = 3600 * _US


@dataclass(frozen=True, slots=True)
class HoldRow:
    id: str
    organization_id: str
    meter_id: str
    customer_id: str
    external_id: str
    units: float
    created_at_us: int
    expires_at_us: int
    stored_status: Stored
    ended_at_us: int | None

    def status(self, now_us: int) -> Status:
        if self.stored_status == "active" and self.expires_at_us <= now_us:
            return "expired"
        return self.stored_status


@dataclass(frozen=True, slots=True)
class Created:
    """A hold as its job left it, with what its answer shows, from the job's hands: its
    customer meter and the units its active holds reserve (`held`), its customer (and the time
    of the customer's first event) and its meter. `replayed` when its external_id had made
    this hold before (nothing changed). A release answers one too. Without `customer`: an
    outcome stored before answers were whole (its reader reads them)."""

    hold: HoldRow
    customer_meter: CustomerMeter
    held: float
    replayed: bool
    customer: CustomerRow | None = None
    first_event_us: int | None = None
    meter: MeterRow | None = None


_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, meter_id::VARCHAR, customer_id::VARCHAR,"
    " external_id, units, epoch_us(created_at), epoch_us(expires_at), status, epoch_us(ended_at)"
)
# Active: neither ended nor past its expiry.
_ACTIVE = "status = 'active' AND expires_at > make_timestamptz(?)"


def _row(r: tuple[Any, ...]) -> HoldRow:
    stored = cast(Stored, r[8])
    return HoldRow(r[0], r[1], r[2], r[3], r[4], float(r[5]), int(r[6]), int(r[7]), stored, r[9])


def create_job(
    organization_id: str,
    data: HoldCreate,
    now_us: int,
    limits: TenantLimits = quotas.DEFAULTS,
    *,
    hold_id: str,
) -> Job[Created]:
    request = idempotency.digest(data)

    # Independent: the balance and the holds are read from memory (every applied event in
    # them), and no stored event is read, so the job need not wait for applied events to be
    # stored. Decided from memory (`HoldKeys`, the catalog's meter); DuckDB is asked for the
    # idempotency key, the customer and its first event time only.
    @independent
    def job(tx: Tx) -> Created:
        con = tx.con
        used = idempotency.recall(con, organization_id, "hold", data.external_id, request)
        customer, meter = resolve(tx, organization_id, data)
        kept(tx, customer)
        if meter.aggregation.func not in HOLDABLE:
            raise ValidationFailed(
                [
                    FieldError(
                        "meter_aggregation",
                        ("body", "meter_id"),
                        "Holds apply to count and sum meters only; this meter's aggregation"
                        f" is {meter.aggregation.func}.",
                        str(data.meter_id),
                    )
                ],
                business=True,
            )
        holds = tx.live.feature(HoldKeys)
        if used is not None:
            found = _by_external_id(con, organization_id, data.external_id)
            assert found is not None
            return _answer(tx, found, customer, meter, now_us, replayed=True)
        if holds.active(organization_id, now_us) >= limits.holds:
            raise quotas.HOLDS.refused(limits)
        available = held_customer_meter(tx.live.balances, customer, meter).balance - holds.reserved(
            organization_id, customer.id, meter.id, now_us
        )
        if available < data.units:
            raise InsufficientBalance(data.units, available)
        hold = HoldRow(
            hold_id,
            organization_id,
            meter.id,
            customer.id,
            data.external_id,
            data.units,
            now_us,
            now_us + data.expires_in_seconds * _US,
            "active",
            None,
        )
        con.execute(
            "INSERT INTO meter_holds VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, ?, ?, ?,"
            " make_timestamptz(?), make_timestamptz(?), 'active', NULL, ?)",
            [
                hold.id,
                organization_id,
                meter.id,
                customer.id,
                customer.external_id,
                hold.external_id,
                hold.units,
                hold.created_at_us,
                hold.expires_at_us,
                tx.live.seq.last,  # settled by events applied after it only (`settle`)
            ],
        )
        idempotency.remember(
            con, organization_id, "hold", data.external_id, request, hold.id, now_us
        )
        # Now, not at commit: an event in this same transaction may settle it, a hold after
        # it in this transaction must see it.
        holds.opened(hold)
        tx.live.stage(lambda: holds.made(hold))
        return _answer(tx, hold, customer, meter, now_us)

    return job


def _answer(
    tx: Tx,
    hold: HoldRow,
    customer: CustomerRow,
    meter: MeterRow,
    now_us: int,
    *,
    replayed: bool = False,
) -> Created:
    """What a hold's job answers: the hold and its customer meter as the job leaves them."""
    balance = held_customer_meter(tx.live.balances, customer, meter)
    held = tx.live.feature(HoldKeys).reserved(hold.organization_id, customer.id, meter.id, now_us)
    first = first_event_us(tx.live, customer)
    return Created(hold, balance, held, replayed, customer, first, meter)


def release_job(organization_id: str, hold_id: str, now_us: int) -> Job[Created]:
    """End an active hold (its units are available again); an ended one is answered as it is."""

    @independent
    def job(tx: Tx) -> Created:
        hold = get_hold(tx.con, organization_id, hold_id)
        if hold is None:
            raise NotFound("Hold not found")
        customer = get_customer(tx.con, organization_id, hold.customer_id)
        meter = tx.live.catalog.meter(tx.con, organization_id, hold.meter_id)
        if customer is None or meter is None:  # its customer deleted (which ended it)
            raise NotFound("Hold not found: its customer was deleted")
        if hold.status(now_us) == "active":
            tx.con.execute(
                "UPDATE meter_holds SET status = 'released', ended_at = make_timestamptz(?)"
                " WHERE id = ?::UUID",
                [now_us, hold_id],
            )
            _forget(tx.live, organization_id, [hold.external_id])
            hold = replace(hold, stored_status="released", ended_at_us=now_us)
        return _answer(tx, hold, customer, meter, now_us)

    return job


def _forget(live: Live, organization_id: str, external_ids: Iterable[str]) -> None:
    ended = list(external_ids)
    keys = live.feature(HoldKeys)
    keys.ending(organization_id, ended)
    live.stage(lambda: keys.forget(organization_id, ended))


def get_hold(con: Con, organization_id: str, hold_id: str) -> HoldRow | None:
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM meter_holds"  # noqa: S608 (constant columns)
        " WHERE organization_id = ?::UUID AND id = TRY_CAST(? AS UUID)",
        [organization_id, hold_id],
    )
    return None if row is None else _row(row)


def _by_external_id(con: Con, organization_id: str, external_id: str) -> HoldRow | None:
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM meter_holds"  # noqa: S608 (constant columns)
        " WHERE organization_id = ?::UUID AND external_id = ?",
        [organization_id, external_id],
    )
    return None if row is None else _row(row)


def list_holds(
    con: Con,
    organization_id: str,
    *,
    customer_id: str | None,
    meter_id: str | None,
    active_at_us: int | None,
    limit: int,
    offset: int,
) -> tuple[list[HoldRow], int]:
    """The organization's holds, newest first, and how many there are; only those active at
    `active_at_us` when given."""
    where = ["organization_id = ?::UUID"]
    params: list[Any] = [organization_id]
    if customer_id is not None:
        where.append("customer_id = ?::UUID")
        params.append(customer_id)
    if meter_id is not None:
        where.append("meter_id = ?::UUID")
        params.append(meter_id)
    if active_at_us is not None:
        where.append(_ACTIVE)
        params.append(active_at_us)
    condition = " AND ".join(where)
    total = int(
        con.execute(
            f"SELECT count(*) FROM meter_holds WHERE {condition}",  # noqa: S608 (constants)
            params,
        ).fetchall()[0][0]
    )
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM meter_holds WHERE {condition}"  # noqa: S608 (constants)
        " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return [_row(r) for r in rows], total


def held_in_memory(live: Live, customer_id: str, meter_id: str, now_us: int) -> float:
    """The units the customer meter's committed active holds reserve, from memory (a balance
    check's read, on any thread)."""
    return live.feature(HoldKeys).held(customer_id, meter_id, now_us)


def held(con: Con, customer_id: str, meter_id: str, now_us: int) -> float:
    """The units the customer meter's active holds reserve (in a writer job: its own
    transaction's holds included)."""
    return held_by_pair(con, [(customer_id, meter_id)], now_us).get((customer_id, meter_id), 0.0)


def held_by_pair(
    con: Con, pairs: list[tuple[str, str]], now_us: int
) -> dict[tuple[str, str], float]:
    """The units active holds reserve, per (customer id, meter id) of `pairs` that have any."""
    if not pairs:
        return {}
    rows = con.execute(
        "SELECT h.customer_id::VARCHAR, h.meter_id::VARCHAR, sum(h.units)"  # noqa: S608 (constant)
        " FROM meter_holds h JOIN (SELECT unnest(?::VARCHAR[]) AS c, unnest(?::VARCHAR[]) AS m) p"
        f" ON h.customer_id::VARCHAR = p.c AND h.meter_id::VARCHAR = p.m WHERE {_ACTIVE}"
        " GROUP BY ALL",
        [[c for c, _ in pairs], [m for _, m in pairs], now_us],
    ).fetchall()
    return {(str(c), str(m)): float(units) for c, m, units in rows}


class HoldKeys(Feature):
    """The holds that may be active, in memory, the truth a hold is decided from:

    - per organization, their external ids, so that applying events looks for holds to settle
      only where an event names one: grown by each hold as it is made (in its transaction: an
      event of the same transaction may settle it), shrunk as holds end (at commit); a superset
      is harmless;
    - per customer meter, each committed hold's units and expiry, so that a balance check reads
      what holds reserve without a statement (`held`): added and removed at commit; per
      organization, their expiries in order, so that the active ones are counted (`active`)
      against `TenantLimits.holds`, and those expired `KEPT_EXPIRED_US` before are dropped
      (a record's time may lag another's: a write from an edge whose clock is behind);
    - the holds the open transaction made and ended, so that a hold decided after another in
      the same group commit sees it (`reserved`, `active`): dropped at every begin and
      rollback.

    Read at open (`load`)."""

    def __init__(self) -> None:
        self._keys: dict[str, set[str]] = {}
        self._lock = threading.Lock()  # readers' threads read `_units` as the writer changes it
        # (customer id, meter id) -> external id -> (units, expires at); and where each is.
        self._units: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        # Per organization: (expires at, external id) of its committed holds, sorted.
        self._expiries: dict[str, list[tuple[int, str]]] = {}
        self._opened: list[HoldRow] = []  # by the open transaction
        self._ended: set[tuple[str, str]] = set()  # (organization, external id), likewise

    def load(self, con: Con, now_us: int) -> None:
        rows = con.execute(
            "SELECT organization_id::VARCHAR, external_id, customer_id::VARCHAR,"  # noqa: S608
            f" meter_id::VARCHAR, units, epoch_us(expires_at) FROM meter_holds WHERE {_ACTIVE}",
            [now_us],
        ).fetchall()
        self._keys = {}
        for org, external_id, customer_id, meter_id, units, expires_us in rows:
            self.add(str(org), str(external_id))
            self._hold(
                str(org), str(external_id), str(customer_id), str(meter_id), units, expires_us
            )

    def begin(self) -> None:
        self._opened, self._ended = [], set()

    def rollback(self) -> None:
        self.begin()

    def of(self, organization_id: str) -> set[str]:
        return self._keys.get(organization_id, set())

    def add(self, organization_id: str, external_id: str) -> None:
        self._keys.setdefault(organization_id, set()).add(external_id)

    def opened(self, hold: HoldRow) -> None:
        """A hold made in the open transaction (its job, before it returns)."""
        self.add(hold.organization_id, hold.external_id)
        self._opened.append(hold)

    def ending(self, organization_id: str, external_ids: Iterable[str]) -> None:
        """Holds ended in the open transaction (released or settled)."""
        self._ended.update((organization_id, e) for e in external_ids)

    def made(self, hold: HoldRow) -> None:
        """A hold committed (an effect staged by its job)."""
        self._hold(
            hold.organization_id,
            hold.external_id,
            hold.customer_id,
            hold.meter_id,
            hold.units,
            hold.expires_at_us,
        )

    def _hold(
        self,
        organization_id: str,
        external_id: str,
        customer_id: str,
        meter_id: str,
        units: float,
        expires_us: int,
    ) -> None:
        pair = (customer_id, meter_id)
        with self._lock:
            if (organization_id, external_id) in self._pairs:
                return
            self._units.setdefault(pair, {})[external_id] = (float(units), int(expires_us))
            self._pairs[(organization_id, external_id)] = pair
            bisect.insort(self._expiries.setdefault(organization_id, []), (expires_us, external_id))

    def forget(self, organization_id: str, external_ids: list[str]) -> None:
        """Holds ended (released or settled; at commit)."""
        self._keys.get(organization_id, set()).difference_update(external_ids)
        with self._lock:
            for external_id in external_ids:
                self._drop(organization_id, external_id)

    def _drop(self, organization_id: str, external_id: str) -> None:
        """(Under the lock.)"""
        pair = self._pairs.pop((organization_id, external_id), None)
        if pair is None:
            return
        held = self._units[pair]
        _, expires = held.pop(external_id)
        if not held:
            del self._units[pair]
        expiries = self._expiries[organization_id]
        del expiries[bisect.bisect_left(expiries, (expires, external_id))]

    def _expires(self, organization_id: str, external_id: str) -> int:
        """When a committed hold expires (0: none is held). Under the lock."""
        pair = self._pairs.get((organization_id, external_id))
        return 0 if pair is None else self._units[pair][external_id][1]

    def held(self, customer_id: str, meter_id: str, now_us: int) -> float:
        """The units the customer meter's committed holds reserve at `now_us` (an expired one
        reserves nothing: expiry writes nothing)."""
        with self._lock:
            held = self._units.get((customer_id, meter_id))
            return sum(u for u, expires in held.values() if expires > now_us) if held else 0.0

    def reserved(self, organization_id: str, customer_id: str, meter_id: str, now_us: int) -> float:
        """`held`, as the open transaction left it (writer thread)."""
        with self._lock:
            held = self._units.get((customer_id, meter_id), {})
            units = math.fsum(
                u
                for e, (u, expires) in held.items()
                if expires > now_us and (organization_id, e) not in self._ended
            )
        return units + math.fsum(
            h.units
            for h in self._opened_active(organization_id, now_us)
            if (h.customer_id, h.meter_id) == (customer_id, meter_id)
        )

    def active(self, organization_id: str, now_us: int) -> int:
        """How many holds of the organization are active at `now_us`, as the open transaction
        left it (writer thread); those expired by then are dropped."""
        with self._lock:
            expiries = self._expiries.get(organization_id, [])
            gone = bisect.bisect_right(expiries, now_us - KEPT_EXPIRED_US, key=_expiry)
            for _, external_id in expiries[:gone]:
                self._drop(organization_id, external_id)
                self._keys.get(organization_id, set()).discard(external_id)
            count = len(expiries) - bisect.bisect_right(expiries, now_us, key=_expiry)
            ended = sum(
                1
                for org, e in self._ended
                if org == organization_id and self._expires(org, e) > now_us
            )
        return count - ended + sum(1 for _ in self._opened_active(organization_id, now_us))

    def _opened_active(self, organization_id: str, now_us: int) -> Iterator[HoldRow]:
        """The organization's holds the open transaction made that are active at `now_us`
        (not expired, not ended since in the same transaction)."""
        for h in self._opened:
            if (
                h.organization_id == organization_id
                and h.expires_at_us > now_us
                and (organization_id, h.external_id) not in self._ended
            ):
                yield h


def _expiry(entry: tuple[int, str]) -> int:
    return entry[0]


def settle(
    con: Con,
    live: Live,
    source: str,
    events: pa.Table,
    meters: Mapping[str, Sequence[MeterRow]],
    at_us: int,
) -> None:
    """End the active holds that the new `events` (registered as `source`) settle: same
    organization, external_id and customer, the event is in the hold's meter, and it was
    applied after the hold was made (its seq: applied again, an event keeps it). Runs in the
    events' transaction, so their consumption replaces the holds at once."""
    held = live.feature(HoldKeys)
    organizations = [org for org in meters if held.of(org)]
    if not organizations:
        return
    named = pc.is_valid(events.column("external_id"))
    if not pc.any(named).as_py():
        return
    external_ids = events.filter(named).column("external_id")
    candidates: list[tuple[str, str, str]] = []  # organization, meter, external id
    for org in organizations:
        keys = pa.array(sorted(held.of(org)), pa.string())
        if not pc.any(pc.is_in(external_ids, value_set=keys)).as_py():
            continue
        candidates += con.execute(
            "SELECT h.organization_id::VARCHAR, h.meter_id::VARCHAR, h.external_id"  # noqa: S608
            f" FROM meter_holds h JOIN {source} b"  # (source: a registered table's name)
            " ON b.organization_id = h.organization_id::VARCHAR AND b.external_id = h.external_id"
            " AND (b.customer_id = h.customer_id::VARCHAR"
            " OR b.external_customer_id = h.customer_external_id)"
            " WHERE h.organization_id = ?::UUID AND h.status = 'active' AND b.seq > h.after_seq"
            " AND h.expires_at > make_timestamptz(?)",
            [org, at_us],
        ).fetchall()
    settled: dict[str, list[str]] = {}
    for org, meter_id, external_id in candidates:
        meter = next((m for m in meters[org] if m.id == meter_id), None)
        if meter is None or not _in_meter(con, source, meter, external_id):
            continue
        con.execute(
            "UPDATE meter_holds SET status = 'settled', ended_at = make_timestamptz(?)"
            " WHERE organization_id = ?::UUID AND external_id = ?",
            [at_us, org, external_id],
        )
        settled.setdefault(org, []).append(external_id)
    for org, ended in settled.items():
        _forget(live, org, ended)


def _in_meter(con: Con, source: str, meter: MeterRow, external_id: str) -> bool:
    where, params = meter_events_sql(meter.filter, meter.aggregation)
    found = con.execute(
        f"SELECT count(*) FROM {source} WHERE organization_id = ?"  # noqa: S608
        f" AND external_id = ? AND {where}",
        [meter.organization_id, external_id, *params],
    ).fetchall()
    return bool(found[0][0])
