"""The credit ledger: customer meters (list, get, a customer's state, its grants), credits and
resets, and the balance check."""

from __future__ import annotations

from dataclasses import dataclass, replace

import duckdb

from aggregator.errors import NotFound
from aggregator.services.customer_service import Customer, with_first_events
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import (
    Balances,
    CustomerMeter,
    CustomerRow,
    GrantRow,
    Live,
    MeterRow,
    Store,
    dimensions,
    meters_by_ids,
    subjects,
)
from aggregator.store import customer_tables as customer_sql
from aggregator.store import grant_tables as grant_sql
from aggregator.store import hold_tables as hold_sql
from aggregator.store import ledger_reads as reads
from aggregator.store import ledger_tables as sql
from meters.ledger_rules import CreditCreate, ResetCreate, burn
from meters.times import now_us

__all__ = [
    "Applied",
    "BalanceCheck",
    "CustomerMeter",
    "CustomerMeterView",
    "CustomerState",
    "Grants",
    "check",
    "credit",
    "get_customer_meter",
    "grants",
    "list_customer_meters",
    "reset",
    "state",
    "state_by_external_id",
    "state_on",
    "view",
    "views_on",
]

Con = duckdb.DuckDBPyConnection
# Customer meters a customer's state lists, at most.
STATE_METERS = 10_000


@dataclass(frozen=True, slots=True)
class CustomerMeterView:
    """A customer meter with its customer and its meter."""

    balance: CustomerMeter
    customer: Customer
    meter: MeterRow


@dataclass(frozen=True, slots=True)
class CustomerState:
    """A customer and the balances of its active meters."""

    customer: Customer
    meters: list[CustomerMeter]


@dataclass(frozen=True, slots=True)
class Grants:
    """A customer meter's grants in its window (in the order granted) and what remains of each
    (`meters.ledger_rules.burn`: 0 once expired); `beyond`: the consumption no grant covers.
    sum(remaining) − beyond = the balance."""

    customer_meter: CustomerMeter
    grants: list[tuple[GrantRow, float]]
    beyond: float


@dataclass(frozen=True, slots=True)
class Applied:
    """A credit's or reset's customer meter, with its balance as the call left it; `replayed`
    when the idempotency key had been used (nothing changed)."""

    customer_meter: CustomerMeterView
    replayed: bool


@dataclass(frozen=True, slots=True)
class BalanceCheck:
    """Whether the customer may use `units` more of the meter."""

    units: float
    balance: CustomerMeter

    @property
    def allowed(self) -> bool:
        return self.balance_after >= 0

    @property
    def balance_after(self) -> float:
        """The balance after `units` more, less what active holds reserve."""
        return self.balance.available - self.units


def _meters(con: Con, organization_id: str, meter_ids: list[str]) -> dict[str, MeterRow]:
    """The meters of customer meters found (they exist: their ids come from the same read)."""
    meters = meters_by_ids(con, organization_id, meter_ids)
    assert all(m in meters for m in meter_ids)
    return meters


def _views(
    con: Con,
    balances: Balances,
    organization_id: str,
    pairs: list[tuple[str, str]],
    at_us: int | None = None,
) -> list[CustomerMeterView]:
    """The customer meters of (customer id, meter id) pairs: one read of their customers, one
    of the customers' first events, one of their meters; balances from memory; holds as they
    stand at `at_us` (now by default)."""
    rows = customer_sql.customers_by_refs(con, organization_id, [p[0] for p in pairs], [])
    customers = {c.row.id: c for c in with_first_events(con, organization_id, rows)}
    meters = _meters(con, organization_id, [meter_id for _, meter_id in pairs])
    holds = hold_sql.held_by_pair(con, pairs, now_us() if at_us is None else at_us)
    out = []
    for customer_id, meter_id in pairs:
        customer, meter = customers.get(customer_id), meters.get(meter_id)
        if customer is None or meter is None:  # a hold's customer deleted since
            raise NotFound("Customer or meter not found")
        balance = reads.held_customer_meter(balances, customer.row, meter)
        held = holds.get((customer_id, meter_id), 0.0)
        out.append(CustomerMeterView(replace(balance, held=held), customer, meter))
    return out


async def list_customer_meters(
    store: Store,
    organization_id: str,
    *,
    customer_ids: tuple[str, ...],
    external_customer_ids: tuple[str, ...],
    meter_ids: list[str] | None,
    descending: bool,
    page: int,
    limit: int,
) -> Page[CustomerMeterView]:
    """The active customer meters of the customers named (all if none) and of the meters named
    (all unarchived ones if None: archived meters show only when asked for by id)."""
    named = bool(customer_ids or external_customer_ids)
    balances = store.live.balances

    def run(con: Con) -> Page[CustomerMeterView]:
        pairs, total = reads.active_pairs(
            con,
            balances,
            organization_id,
            customer_ids=list(customer_ids) if named else None,
            external_ids=list(external_customer_ids) if named else None,
            meter_ids=meter_ids,
            limit=limit,
            offset=offset(page, limit),
            descending=descending,
        )
        return Page(_views(con, balances, organization_id, pairs), total)

    return await store.read(run)


# More meters than an organization has: all of one customer's customer meters in one page.
_ALL = 2**31 - 1


async def customer_meters_of(
    store: Store, organization_id: str, customer_id: str, meter_ids: list[str] | None
) -> list[CustomerMeterView]:
    """All active customer meters of one customer (the customer portal's, which sorts and
    pages them itself: a customer has at most one per meter)."""
    balances = store.live.balances

    def run(con: Con) -> list[CustomerMeterView]:
        pairs, _ = reads.active_pairs(
            con,
            balances,
            organization_id,
            customer_ids=[customer_id],
            external_ids=[],
            meter_ids=meter_ids,
            limit=_ALL,
            offset=0,
        )
        return _views(con, balances, organization_id, pairs)

    return await store.read(run)


def _pair(
    con: Con, balances: Balances, organization_id: str, customer_meter_id: str
) -> tuple[str, str]:
    """(customer id, meter id) of the customer meter; 404 unless it is one."""
    pairs, _ = reads.active_pairs(
        con,
        balances,
        organization_id,
        customer_ids=None,
        external_ids=None,
        meter_ids=None,
        id=customer_meter_id,
        limit=1,
        offset=0,
    )
    if not pairs:
        raise NotFound("Customer meter not found")
    return pairs[0]


async def get_customer_meter(
    store: Store, organization_id: str, customer_meter_id: str
) -> CustomerMeterView:
    balances = store.live.balances

    def run(con: Con) -> CustomerMeterView:
        pair = _pair(con, balances, organization_id, customer_meter_id)
        return _views(con, balances, organization_id, [pair])[0]

    return await store.read(run)


@dataclass(frozen=True, slots=True)
class Breakdown:
    """A customer meter, and per group of the dimensions asked (their values) the units of its
    window's events (the groups together make its consumed units)."""

    view: CustomerMeterView
    groups: list[tuple[dict[str, str | None], float]]


async def breakdown(
    store: Store, organization_id: str, customer_meter_id: str, group_by: tuple[str, ...]
) -> Breakdown:
    """The customer meter's consumed units split by its meter's dimensions `group_by` (a 422
    naming `group_by` for one it does not declare, or none asked)."""
    balances = store.live.balances

    def run(con: Con) -> Breakdown:
        pair = _pair(con, balances, organization_id, customer_meter_id)
        view = _views(con, balances, organization_id, [pair])[0]
        meter = view.meter
        dimensions.declared(meter, group_by, (), required=True)
        references = subjects.of_customer(view.customer.row)
        found = dimensions.breakdown(con, meter, references, group_by)
        groups = [
            (
                dict(zip(group_by, dimensions.group_of(key, len(group_by)), strict=True)),
                p.result(meter.aggregation.func),
            )
            for key, p in sorted(found.items())
        ]
        return Breakdown(view, groups)

    return await store.read(run)


async def grants(store: Store, organization_id: str, customer_meter_id: str) -> Grants:
    """A customer meter's grants, with consumption as the balances in memory hold it."""
    balances = store.live.balances

    def run(con: Con) -> Grants:
        customer_id, meter_id = _pair(con, balances, organization_id, customer_meter_id)
        customer = customer_sql.get_customer(con, organization_id, customer_id)
        assert customer is not None  # a pair's customer exists: the pair comes from its row
        meter = _meters(con, organization_id, [meter_id])[meter_id]
        cm = reads.held_customer_meter(balances, customer, meter)
        rows = grant_sql.grants_of(con, customer_id, meter_id)
        burned = burn([r.grant for r in rows], cm.consumed)
        return Grants(cm, list(zip(rows, burned.remaining, strict=True)), burned.beyond)

    return await store.read(run)


def _state(
    con: Con, balances: Balances, organization_id: str, customer: CustomerRow | None
) -> CustomerState:
    if customer is None:
        raise NotFound("Customer not found")
    pairs, _ = reads.active_pairs(
        con,
        balances,
        organization_id,
        customer_ids=[customer.id],
        external_ids=None,
        meter_ids=None,
        limit=STATE_METERS,
        offset=0,
    )
    meters = _meters(con, organization_id, [meter_id for _, meter_id in pairs])
    holds = hold_sql.held_by_pair(con, pairs, now_us())
    return CustomerState(
        with_first_events(con, organization_id, [customer])[0],
        [
            replace(
                reads.held_customer_meter(balances, customer, meters[meter_id]),
                held=holds.get((customer.id, meter_id), 0.0),
            )
            for _, meter_id in pairs
        ],
    )


def state_on(
    con: Con, balances: Balances, organization_id: str, customer_id: str
) -> CustomerState | None:
    """A customer's state on a connection the caller holds (the writer's); None if it is
    gone."""
    customer = customer_sql.get_customer(con, organization_id, customer_id)
    return None if customer is None else _state(con, balances, organization_id, customer)


async def state(store: Store, organization_id: str, customer_id: str) -> CustomerState:
    balances = store.live.balances
    return await store.read(
        lambda con: _state(
            con,
            balances,
            organization_id,
            customer_sql.get_customer(con, organization_id, customer_id),
        )
    )


async def state_by_external_id(
    store: Store, organization_id: str, external_id: str
) -> CustomerState:
    balances = store.live.balances
    return await store.read(
        lambda con: _state(
            con,
            balances,
            organization_id,
            customer_sql.get_customer_by_external_id(con, organization_id, external_id),
        )
    )


def views_on(
    con: Con,
    balances: Balances,
    organization_id: str,
    pairs: list[tuple[str, str]],
    at_us: int | None = None,
) -> list[CustomerMeterView]:
    """The customer meters of (customer id, meter id) `pairs`, on a connection the caller
    holds (the writer's, inside its transaction), in a fixed number of statements; holds as
    they stand at `at_us` (a record's time, so that every core applying it agrees), else now."""
    return _views(con, balances, organization_id, pairs, at_us)


async def view(
    store: Store, organization_id: str, customer_id: str, meter_id: str
) -> CustomerMeterView:
    """One customer meter, with its customer and meter, as it is now."""
    pair = (customer_id, meter_id)
    views = await store.read(lambda con: _views(con, store.live.balances, organization_id, [pair]))
    return views[0]


async def _applied(store: Store, organization_id: str, applied: sql.Applied) -> Applied:
    """The balance as the call left it (a replay answers what the first call did), with its
    customer and meter as the job had them and what holds reserve now, from memory; read only
    where the job did not resolve them."""
    cm = applied.customer_meter
    held = hold_sql.held_in_memory(store.live, cm.customer_id, cm.meter_id, now_us())
    if applied.customer is None or applied.meter is None:
        found = await view(store, organization_id, cm.customer_id, cm.meter_id)
        customer, meter = found.customer, found.meter
    else:
        customer = Customer(applied.customer, applied.first_event_us)
        meter = applied.meter
    return Applied(CustomerMeterView(replace(cm, held=held), customer, meter), applied.replayed)


async def credit(
    store: Store, organization_id: str, data: CreditCreate, *, request_id: str | None = None
) -> Applied:
    applied = await store.submit(record("ledger.credit", organization_id, request_id, data=data))
    return await _applied(store, organization_id, applied)


async def reset(
    store: Store, organization_id: str, data: ResetCreate, *, request_id: str | None = None
) -> Applied:
    applied = await store.submit(record("ledger.reset", organization_id, request_id, data=data))
    return await _applied(store, organization_id, applied)


def _check(
    con: Con,
    live: Live,
    organization_id: str,
    meter_id: str,
    customer_id: str | None,
    external_customer_id: str | None,
    units: float,
) -> BalanceCheck:
    catalog = live.catalog
    customer = (
        catalog.customer(con, organization_id, customer_id)
        if customer_id
        else catalog.customer_by_external_id(con, organization_id, external_customer_id or "")
    )
    meter = catalog.meter(con, organization_id, meter_id)
    if customer is None or meter is None:
        raise NotFound("Customer or meter not found")
    balance = reads.held_customer_meter(live.balances, customer, meter)
    held = hold_sql.held_in_memory(live, customer.id, meter.id, now_us())
    return BalanceCheck(units, replace(balance, held=held))


async def check(
    store: Store,
    organization_id: str,
    meter_id: str,
    customer_id: str | None,
    external_customer_id: str | None,
    units: float,
) -> BalanceCheck:
    """May the customer use `units` more of the meter, after what active holds reserve? The
    balance and the holds from memory (`live`); DuckDB is read only for a customer or meter not
    held in memory yet."""
    return await store.read_now(
        _check, store.live, organization_id, meter_id, customer_id, external_customer_id, units
    )
