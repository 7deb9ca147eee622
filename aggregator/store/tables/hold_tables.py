"""SQL for holds: units of a customer meter's balance reserved before they are spent.

A hold is decided in the writer (`create_job`): its transaction reads the balance and the
active holds, so holds committed together can never reserve more than the balance. It ends
when the usage event with the same `external_id`, customer and meter is applied (`settle`, in
that event's transaction: its consumption replaces the hold), when it is released, or when it
expires (`expires_at` passed: nothing is written, every read takes the time into account).

`HoldKeys` holds, per organization, the external ids of holds that may be active: a
superset (a key is added when a hold's job runs, removed when its end commits), so that
ingest looks for holds to settle only in batches naming one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
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
from aggregator.store.tables.ledger_reads import CustomerMeter, held_customer_meter
from aggregator.store.tables.ledger_tables import kept, resolve
from aggregator.store.tables.quotas import TenantLimits
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import HOLDABLE, HoldCreate

__all__ = [
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
    """A hold and its customer meter as the hold left it; `replayed` when its external_id had
    made this hold before (nothing changed)."""

    hold: HoldRow
    customer_meter: CustomerMeter
    held: float
    replayed: bool


_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, meter_id::VARCHAR, customer_id::VARCHAR,"
    " external_id, units, epoch_us(created_at), epoch_us(expires_at), status, epoch_us(ended_at)"
)
# Active: neither ended nor past its expiry.
_ACTIVE = "status = 'active' AND expires_at > make_timestamptz(?)"
_HOLDS = f"SELECT count(*) FROM meter_holds WHERE organization_id = ?::UUID AND {_ACTIVE}"  # noqa: S608 - fixed text, values bound


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

    # Independent: the balance is read from memory (every applied event in it), and no stored
    # event is read, so the job need not wait for applied events to be stored.
    @independent
    def job(tx: Tx) -> Created:
        con = tx.con
        used = idempotency.recall(con, organization_id, "hold", data.external_id, request)
        customer, meter = resolve(con, organization_id, data)
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
        balance = held_customer_meter(tx.live.balances, customer, meter)
        if used is not None:
            hold = _by_external_id(con, organization_id, data.external_id)
            assert hold is not None
            return Created(hold, balance, held(con, customer.id, meter.id, now_us), True)
        quotas.check(con, limits, quotas.HOLDS, _HOLDS, [organization_id, now_us])
        holding = held(con, customer.id, meter.id, now_us)
        available = balance.balance - holding
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
        # Now, not at commit: an event in this same transaction may settle it (a superset).
        holds = tx.live.feature(HoldKeys)
        holds.add(organization_id, hold.external_id)
        tx.live.stage(lambda: holds.made(hold))
        return Created(hold, balance, holding + hold.units, False)

    return job


def release_job(organization_id: str, hold_id: str, now_us: int) -> Job[HoldRow]:
    """End an active hold (its units are available again); an ended one is answered as it is."""

    @independent
    def job(tx: Tx) -> HoldRow:
        hold = get_hold(tx.con, organization_id, hold_id)
        if hold is None:
            raise NotFound("Hold not found")
        if hold.status(now_us) != "active":
            return hold
        tx.con.execute(
            "UPDATE meter_holds SET status = 'released', ended_at = make_timestamptz(?)"
            " WHERE id = ?::UUID",
            [now_us, hold_id],
        )
        _forget(tx.live, organization_id, [hold.external_id])
        return replace(hold, stored_status="released", ended_at_us=now_us)

    return job


def _forget(live: Live, organization_id: str, external_ids: Iterable[str]) -> None:
    ended = list(external_ids)
    keys = live.feature(HoldKeys)
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
    """The holds that may be active, in memory:

    - per organization, their external ids, so that applying events looks for holds to settle
      only where an event names one: grown by each hold as it is made (in its transaction: an
      event of the same transaction may settle it), shrunk as holds end (at commit); a superset
      is harmless;
    - per customer meter, each committed hold's units and expiry, so that a balance check reads
      what holds reserve without a statement (`held`): added and removed at commit.

    Read at open (`load`); at most `TenantLimits.holds` active holds per organization."""

    def __init__(self) -> None:
        self._keys: dict[str, set[str]] = {}
        self._lock = threading.Lock()  # readers' threads read `_units` as the writer changes it
        # (customer id, meter id) -> external id -> (units, expires at); and where each is.
        self._units: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

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

    def of(self, organization_id: str) -> set[str]:
        return self._keys.get(organization_id, set())

    def add(self, organization_id: str, external_id: str) -> None:
        self._keys.setdefault(organization_id, set()).add(external_id)

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
            self._units.setdefault(pair, {})[external_id] = (float(units), int(expires_us))
            self._pairs[(organization_id, external_id)] = pair

    def forget(self, organization_id: str, external_ids: list[str]) -> None:
        """Holds ended (released or settled; at commit)."""
        self._keys.get(organization_id, set()).difference_update(external_ids)
        with self._lock:
            for external_id in external_ids:
                pair = self._pairs.pop((organization_id, external_id), None)
                held = self._units.get(pair) if pair is not None else None
                if held is not None:
                    held.pop(external_id, None)
                    if not held:
                        del self._units[pair]  # type: ignore[arg-type]

    def held(self, customer_id: str, meter_id: str, now_us: int) -> float:
        """The units the customer meter's committed holds reserve at `now_us` (an expired one
        reserves nothing: expiry writes nothing)."""
        with self._lock:
            held = self._units.get((customer_id, meter_id))
            return sum(u for u, expires in held.values() if expires > now_us) if held else 0.0


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
