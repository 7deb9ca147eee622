"""SQL for the credit ledger: credits, resets and plan cycles (writer jobs), customer meters.

Usage since each customer's latest reset is kept by ingest in memory (`engine.balances`,
written by `engine.ledger_log`); credits are running sums on the
customer meter row, kept equal to its grants' (`grant_tables`, burned and expired by
`meters.ledger_rules`). Every credit, reset and expiry is also a system event (`meter.credited`,
`meter.reset`, `meter.credit_expired`). The caller's idempotency key is kept in
`idempotency`, with the customer meter it answered: replaying a call changes nothing. The
customer meters' reads (usage, credits, balances) are `ledger_reads`'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import duckdb

from aggregator.errors import CustomerElsewhere
from aggregator.store.base import subjects
from aggregator.store.base.ids import derived_id
from aggregator.store.base.meter_rows import MeterRow, get_meter, without_ledger
from aggregator.store.base.rows import first_row
from aggregator.store.engine.balances import Cleared
from aggregator.store.engine.balances import Credits as HeldCredits
from aggregator.store.engine.live import Feature
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.tables import alert_tables, grant_tables, idempotency, webhook_tables
from aggregator.store.tables.customer_tables import (
    CustomerRef,
    CustomerRow,
    find_customer,
    first_event_us,
    get_customer,
    routing_keys,
)
from aggregator.store.tables.event_tables import store_system_event
from meters.aggregations import Partial

if TYPE_CHECKING:
    from aggregator.store.engine.live import Live
from aggregator.store.tables.ledger_reads import (
    CustomerMeter,
    consumed,
    customer_meter,
    customer_meter_id,
)
from meters import ledger_rules as rules
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import (
    MAX_ACTIVE_GRANTS,
    PRIORITY_DEFAULT,
    CreditCreate,
    Credits,
    Grant,
    HoldCreate,
    PlanCreate,
    ResetCreate,
)
from meters.times import datetime_to_us, us_to_datetime

__all__ = [
    "Applied",
    "Ledgers",
    "credit_job",
    "expire_due",
    "reset_job",
]

Con = duckdb.DuckDBPyConnection


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of a credit or reset: the customer meter after it; `replayed` when the
    idempotency key had been used (nothing changed). What its answer shows beside, from the
    job's hands: the customer (and the time of its first event) and the meter; None where the
    job did not resolve them (a replay answered from its key, an outcome stored before)."""

    customer_meter: CustomerMeter
    replayed: bool
    customer: CustomerRow | None = None
    first_event_us: int | None = None
    meter: MeterRow | None = None


# ---- writes ----------------------------------------------------------------------------------


class Ledgers(Feature):
    """Which customers' ledgers this core keeps: a shard of several keeps those of the
    customers it holds (where their events are: a balance is their usage against their
    credits), so that a credit, reset, hold or plan cycle changes one shard's state, fires its
    alerts and webhooks there, and is a system event of that shard alone. `holds` tells, by
    (organization id, routing key), whether this core holds a customer; None: every one."""

    def __init__(self, holds: Callable[[str, str], bool] | None = None) -> None:
        self._holds = holds

    def keeps(self, con: Con, customer: CustomerRow) -> bool:
        if self._holds is None:
            return True
        ref = (customer.organization_id, customer.id, None)
        return self._holds(customer.organization_id, routing_keys(con, [ref])[ref])

    @property
    def sharded(self) -> bool:
        """Whether this core holds some customers only (a shard of several)."""
        return self._holds is not None

    def holding(self, con: Con, refs: list[CustomerRef]) -> dict[CustomerRef, bool]:
        """Whether this core holds the customer each event reference (organization id,
        customer id, external customer id) names, made or not."""
        if self._holds is None:
            return dict.fromkeys(refs, True)
        holds = self._holds
        return {ref: holds(ref[0], key) for ref, key in routing_keys(con, refs).items()}


def kept_elsewhere(con: Con, holds: Callable[[str, str], bool]) -> int:
    """How many customers another shard holds have ledger rows here (credits, holds, system
    events): what a shard's data dir of a version before `Ledgers` kept."""
    rows = con.execute(
        "SELECT organization_id::VARCHAR, id::VARCHAR FROM customers WHERE id IN"
        " (SELECT customer_id FROM customer_meters UNION SELECT customer_id FROM meter_holds"
        " UNION SELECT customer_id FROM events WHERE source = 'system')"
    ).fetchall()
    refs: list[CustomerRef] = [(str(o), str(i), None) for o, i in rows]
    keys = routing_keys(con, refs)
    return sum(not holds(ref[0], keys[ref]) for ref in refs)


def kept(tx: Tx, customer: CustomerRow) -> None:
    """Refuse a write to a customer's ledger that another shard keeps (before any write)."""
    if not tx.live.feature(Ledgers).keeps(tx.con, customer):
        raise CustomerElsewhere()


def credit_job(organization_id: str, data: CreditCreate, now_us: int) -> Job[Applied]:
    """A credit; 422 naming `expires_at` or `priority` when the rules refuse them (at the
    record's time), or when the customer meter holds `MAX_ACTIVE_GRANTS` active grants and this
    one would be another."""
    refused = data.grant_error(us_to_datetime(now_us))
    expires_us = None if data.expires_at is None else datetime_to_us(data.expires_at)
    new = Grant(max(data.units, 0), _priority(data.priority), expires_us, data.rollover)

    def apply(tx: Tx, customer: CustomerRow, meter: MeterRow) -> None:
        if refused is not None:
            raise _grant_refused(*refused, data)
        rows = grant_tables.grants_of(tx.con, customer.id, meter.id)
        if data.units > 0 and not grant_tables.room_for(rows, new, now_us):
            why = (
                f"the customer meter has {MAX_ACTIVE_GRANTS} active grants, the most it may"
                " have; credit a grant of the same priority, expiry and rollover (which adds"
                " to it), or reset the customer meter"
            )
            raise _grant_refused("expires_at", why, data)
        key = f"credit:{data.external_id}"
        credit(
            tx.con,
            customer,
            meter,
            data.units,
            data.rollover,
            now_us,
            now_us,
            tx.live,
            key,
            priority=data.priority,
            expires_at_us=expires_us,
            rows=rows,
        )

    return _keyed_job(organization_id, "credit", data, now_us, apply)


def _priority(given: int | None) -> int:
    return PRIORITY_DEFAULT if given is None else given


def _grant_refused(field: str, why: str, data: CreditCreate) -> ValidationFailed:
    value = getattr(data, field)
    shown = value.isoformat() if hasattr(value, "isoformat") else value
    return ValidationFailed([FieldError("value_error", ("body", field), why, shown)])


def reset_job(organization_id: str, data: ResetCreate, now_us: int) -> Job[Applied]:
    def apply(tx: Tx, customer: CustomerRow, meter: MeterRow) -> None:
        reset(tx.con, customer, meter, now_us, now_us, tx.live, f"reset:{data.external_id}")

    return _keyed_job(organization_id, "reset", data, now_us, apply)


def _keyed_job(
    organization_id: str,
    operation: idempotency.Operation,
    data: CreditCreate | ResetCreate,
    now_us: int,
    apply: Callable[[Tx, CustomerRow, MeterRow], None],
) -> Job[Applied]:
    """`apply(tx, customer, meter)` once per idempotency key; a replay answers the customer
    meter as the first call left it."""
    request = idempotency.digest(data)

    def job(tx: Tx) -> Applied:
        con = tx.con
        used = idempotency.recall(con, organization_id, operation, data.external_id, request)
        if used is not None and used.result is not None:
            return Applied(CustomerMeter(**used.result), replayed=True)
        customer, meter = resolve(tx, organization_id, data)
        kept(tx, customer)
        if used is not None:  # a key kept before answers were: the customer meter as it is
            first = first_event_us(tx.live, customer)
            after = customer_meter(con, tx.live, customer, meter)
            return Applied(after, True, customer, first, meter)
        apply(tx, customer, meter)
        after = customer_meter(con, tx.live, customer, meter)
        first = first_event_us(tx.live, customer)
        idempotency.remember(
            con, organization_id, operation, data.external_id, request, asdict(after), now_us
        )
        return Applied(after, False, customer, first, meter)

    return job


def resolve(
    tx: Tx, organization_id: str, data: CreditCreate | ResetCreate | PlanCreate | HoldCreate
) -> tuple[CustomerRow, MeterRow]:
    """The request's customer and (non-archived) meter, the meter from the catalog in memory;
    422 naming the field otherwise."""
    errors = []
    customer, missing = find_customer(
        tx.con, organization_id, data.customer_id, data.external_customer_id
    )
    if missing is not None:
        errors.append(missing)
    meter = tx.live.catalog.meter(tx.con, organization_id, str(data.meter_id))
    if meter is None or meter.archived_at_us is not None:
        errors.append(
            FieldError(
                "meter_not_found", ("body", "meter_id"), "Meter not found.", str(data.meter_id)
            )
        )
    elif (unkept := without_ledger(meter)) is not None:
        errors.append(unkept)
    if errors:
        raise ValidationFailed(errors, business=True)
    assert customer is not None and meter is not None
    return customer, meter


def _system_event(
    con: Con,
    customer: CustomerRow,
    name: str,
    metadata: dict[str, Any],
    at_us: int,
    now_us: int,
    live: Live,
    key: str,
) -> int:
    """Store the customer's system event `name`; its seq (`store_system_event`)."""
    org = customer.organization_id
    return store_system_event(con, live, org, customer.id, name, metadata, at_us, now_us, key)


def _ensure_row(con: Con, live: Live, customer: CustomerRow, meter: MeterRow, now_us: int) -> None:
    """The customer meter's row, made if it has none. Credits in memory mean a committed row
    (they are loaded from the rows and set with them): no statement then (an insert that
    conflicts cost a reset a third of its time)."""
    if live.balances.credits(customer.id, meter.id) is not None:
        return
    con.execute(
        "INSERT INTO customer_meters (id, organization_id, customer_id, meter_id, created_at,"
        " modified_at) VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, make_timestamptz(?),"
        " make_timestamptz(?)) ON CONFLICT DO NOTHING",
        [
            customer_meter_id(customer.id, meter.id),
            customer.organization_id,
            customer.id,
            meter.id,
            now_us,
            now_us,
        ],
    )


def _store_credits(
    con: Con,
    live: Live,
    customer: CustomerRow,
    meter: MeterRow,
    credits: Credits,
    now_us: int,
    reset_seq: int | None = None,
) -> None:
    con.execute(
        "UPDATE customer_meters SET credited = ?, credited_rollover = ?, credited_plain = ?,"
        " reset_seq = coalesce(?, reset_seq), modified_at = make_timestamptz(?)"
        " WHERE customer_id = ?::UUID AND meter_id = ?::UUID",
        [
            credits.credited,
            credits.rollover,
            credits.plain,
            reset_seq,
            now_us,
            customer.id,
            meter.id,
        ],
    )
    row = first_row(
        con,
        "SELECT credited, epoch_us(created_at), epoch_us(modified_at) FROM customer_meters"
        " WHERE customer_id = ?::UUID AND meter_id = ?::UUID",
        [customer.id, meter.id],
    )
    assert row is not None
    held = HeldCredits(int(row[0]), int(row[1]), int(row[2]))
    live.stage(lambda: live.balances.set_credits(customer.id, meter.id, held))


def credit(
    con: Con,
    customer: CustomerRow,
    meter: MeterRow,
    units: int,
    rollover: bool,
    at_us: int,
    now_us: int,
    live: Live,
    key: str,
    *,
    priority: int | None = None,
    expires_at_us: int | None = None,
    rows: list[grant_tables.GrantRow] | None = None,
) -> None:
    """`key` names the write (the credit's idempotency key, a plan's cycle). Grants expiring by
    `at_us` expire first, so that a revocation never takes units off one that is gone. `rows`:
    the customer meter's grants, where the caller has read them."""
    rows = expire(con, customer, meter, at_us, now_us, live, rows)
    metadata: dict[str, Any] = {"meter_id": meter.id, "units": units, "rollover": rollover}
    # Only when given: a credit without them is the system event it was before grants.
    if priority is not None:
        metadata["priority"] = priority
    if expires_at_us is not None:
        metadata["expires_at"] = us_to_datetime(expires_at_us).isoformat()
    number = _system_event(con, customer, "meter.credited", metadata, at_us, now_us, live, key)
    _ensure_row(con, live, customer, meter, now_us)
    grants = [r.grant for r in rows]
    new_ids = []
    if units > 0:
        new = Grant(units, _priority(priority), expires_at_us, rollover, number)
        after = rules.grant(grants, new)
        if len(after) > len(grants):  # not merged into an active grant: a grant of its own
            new_ids.append(derived_id("credit-grant", customer.organization_id, key))
    else:
        after = rules.revoke(grants, -units, rollover)
    _change_grants(con, live, customer, meter, rows, after, new_ids, now_us, number)


def top_up(
    con: Con,
    live: Live,
    customer: CustomerRow,
    meter: MeterRow,
    new: Grant,
    grant_id: str,
    now_us: int,
) -> bool:
    """Grant `new` for a top-up rule (`topup_tables`), in the transaction of the event that
    caused it; False when the customer meter has no room for another active grant. No system
    event: its seq would be drawn among events not stored yet, which a crash applies again
    under their own seqs. The grant's seq is its event's (the order granted), which also names
    the change to alerts."""
    _ensure_row(con, live, customer, meter, now_us)
    rows = grant_tables.grants_of(con, customer.id, meter.id)
    if not grant_tables.room_for(rows, new, now_us):
        return False
    grants = [r.grant for r in rows]
    after = rules.grant(grants, new)
    new_ids = [grant_id] if len(after) > len(grants) else []
    _change_grants(con, live, customer, meter, rows, after, new_ids, now_us, new.seq)
    return True


def _change_grants(
    con: Con,
    live: Live,
    customer: CustomerRow,
    meter: MeterRow,
    rows: list[grant_tables.GrantRow],
    after: list[Grant],
    new_ids: list[str],
    now_us: int,
    number: int,
) -> None:
    """Store the grants' new state and the customer meter's sums from it; evaluate alerts on
    the change (named by `number`, its system event's seq) and mark the customer's state
    changed."""
    owner = (customer.organization_id, customer.id, meter.id)
    grant_tables.store(con, owner, rows, after, new_ids, now_us)
    credits = _sums(after)
    _store_credits(con, live, customer, meter, credits, now_us)
    before = alert_tables.value(live, customer, meter)
    changed = alert_tables.Value(before.usage, credits.credited)
    alert_tables.on_ledger_change(con, live, customer, meter, before, changed, now_us, number)
    webhook_tables.mark_state_changed(con, live, customer.organization_id, [customer.id], now_us)


def _sums(grants: list[Grant]) -> Credits:
    """The customer meter's running sums, from its grants: credited, and the active grants'
    units with and without rollover."""
    active = [g for g in grants if g.active]
    return Credits(
        rules.credited(grants),
        sum(g.units for g in active if g.rollover),
        sum(g.units for g in active if not g.rollover),
    )


def expire(
    con: Con,
    customer: CustomerRow,
    meter: MeterRow,
    until_us: int,
    now_us: int,
    live: Live,
    rows: list[grant_tables.GrantRow] | None = None,
) -> list[grant_tables.GrantRow]:
    """Expire the customer meter's active grants whose time is at or before `until_us`, each
    at its time and in that order (burn order among equal times), with consumption as applied
    now (the same on every core applying the same journal); its grants after. Each is a system
    event (`meter.credit_expired {meter_id, grant_id, units}`: the unused units it took), a
    change alerts see, and a state change. `rows`: its grants, where the caller read them."""
    read = grant_tables.grants_of(con, customer.id, meter.id) if rows is None else rows
    due = sorted(
        (
            i
            for i, r in enumerate(read)
            if r.grant.active
            and r.grant.expires_at_us is not None
            and r.grant.expires_at_us <= until_us
        ),
        key=lambda i: (read[i].grant.expires_at_us, read[i].grant.burn_key),
    )
    for i in due:
        rows = grant_tables.grants_of(con, customer.id, meter.id)
        grants = [r.grant for r in rows]
        at_us = grants[i].expires_at_us
        assert at_us is not None
        after, taken = rules.expire(grants, i, consumed(live, customer, meter))
        metadata = {"meter_id": meter.id, "grant_id": rows[i].id, "units": taken}
        key = f"expiry:{rows[i].id}"
        number = _system_event(
            con, customer, "meter.credit_expired", metadata, at_us, now_us, live, key
        )
        _change_grants(con, live, customer, meter, rows, after, [], now_us, number)
    return grant_tables.grants_of(con, customer.id, meter.id) if due else read


def expire_due(con: Con, live: Live, now_us: int, enough: Callable[[int], bool] | None) -> int:
    """Expire every grant due at or before `now` (all organizations, earliest first), a
    customer meter at a time, until `enough(expired)` says so (after one at least); how many.
    A shard expires only the grants of the customers it keeps (it has no others' rows). A
    meter archived since keeps its ledger: its grants expire too."""
    expired = 0
    ledgers = live.feature(Ledgers)
    for organization_id, customer_id, meter_id in grant_tables.due(con, now_us):
        if enough and expired and enough(expired):
            break
        customer = get_customer(con, organization_id, customer_id)
        meter = get_meter(con, organization_id, meter_id)
        if customer is None or meter is None or not ledgers.keeps(con, customer):
            # No ledger here to expire them from (a shard's data dir from before `Ledgers`):
            # dropped, so that they are not due again at every run.
            grant_tables.drop(con, customer_id, meter_id)
            continue
        rows = grant_tables.grants_of(con, customer.id, meter.id)
        after = expire(con, customer, meter, now_us, now_us, live, rows)
        expired += sum(r.grant.active for r in rows) - sum(r.grant.active for r in after)
    return expired


def reset(
    con: Con,
    customer: CustomerRow,
    meter: MeterRow,
    at_us: int,
    now_us: int,
    live: Live,
    key: str,
) -> None:
    """Close the window: zero usage and credits, then credit what rolls over (each active
    rollover grant's remaining whole units, with its priority and expiry: `rules.carry`).
    Grants expiring by `at_us` expire first. `key` names the write (the reset's idempotency
    key, a plan's cycle)."""
    rows = expire(con, customer, meter, at_us, now_us, live)
    number = _system_event(
        con, customer, "meter.reset", {"meter_id": meter.id}, at_us, now_us, live, key
    )
    _ensure_row(con, live, customer, meter, now_us)
    carried = rules.carry([r.grant for r in rows], consumed(live, customer, meter))
    grant_tables.drop(con, customer.id, meter.id)
    live.change_ledger(con, Cleared(meter.id, tuple(subjects.of_customer(customer))))
    _store_credits(con, live, customer, meter, Credits(), now_us, reset_seq=number)
    # A reset re-arms the meter's alerts: the value before it counts as outside them.
    after = alert_tables.Value(Partial(), 0)
    alert_tables.on_ledger_change(con, live, customer, meter, None, after, now_us, number)
    webhook_tables.mark_state_changed(con, live, customer.organization_id, [customer.id], now_us)
    if carried:
        # One credit event for what rolls over (as before grants), one grant per carried one.
        units = sum(g.units for g in carried)
        metadata = {"meter_id": meter.id, "units": units, "rollover": True}
        rolled = f"{key}:rollover"
        seq = _system_event(con, customer, "meter.credited", metadata, at_us, now_us, live, rolled)
        grants = [replace(g, seq=seq) for g in carried]
        org = customer.organization_id
        ids = [derived_id("credit-grant", org, rolled, str(i)) for i in range(len(grants))]
        _change_grants(con, live, customer, meter, [], grants, ids, now_us, seq)


# ---- reads -----------------------------------------------------------------------------------
