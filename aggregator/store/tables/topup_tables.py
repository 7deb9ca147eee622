"""SQL for top-up rules, and the top-ups they make in the transaction of the events that
caused them (`meters.topup_rules` says when).

A top-up is decided event by event, where balances are exact: `decide` walks each customer
meter's new events in seq order, from its values before the batch, and `apply` writes what it
decided after the batch's alerts, in the same transaction: the credit (a grant with its
event's seq and no system event: `ledger_tables.top_up`), the `top_ups` row, and the
`customer_meter.topped_up` webhook event (`webhook_tables.enqueue_many`).

Exactly once, without a record per top-up: a top-up follows from the records applied, as an
alert's firing does, so every core applying the same log decides it, and names it the same
(`derived_id` of its rule, customer, meter, period and n-th in that period; its grant's and its
webhook event's ids follow from it). Its time is its event's `ingested_at`, never the applying
core's clock. What a crash can do is apply events again whose top-ups were committed (the
small tables commit with each transaction, the events with a later flush): each row keeps
where its event was in the customer meter's window (`window_seq`, `place`), so `decide` takes
the stored top-ups past the window's count back out of the balance and of the period's count,
meets them again at their events under the same ids, and writes nothing twice.

Organizations' rules are held in memory (`TopUps.rules`, dropped whenever one is made,
changed or deleted), so a batch of an organization without rules costs nothing more.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import NotFound
from aggregator.store.base.arrays import encoded, numpy
from aggregator.store.base.ids import derived_id
from aggregator.store.base.meter_rows import MeterRow, get_meter, without_ledger
from aggregator.store.base.rows import first_row
from aggregator.store.engine.catalog import CustomerKey
from aggregator.store.engine.live import Feature, Live
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering import running
from aggregator.store.metering.rollups import Evaluated
from aggregator.store.tables import alert_tables, hold_tables, ledger_tables, quotas, webhook_tables
from aggregator.store.tables.customer_tables import get_customer, rule_customer
from aggregator.store.tables.quotas import TenantLimits
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import MAX_ACTIVE_GRANTS, Grant
from meters.times import us_to_iso
from meters.topup_rules import (
    TOPPABLE,
    Period,
    TopUpRuleCreate,
    TopUpRuleUpdate,
    loop_error,
    outrun_error,
    period_key,
)

__all__ = [
    "TOPPED_UP",
    "RuleRow",
    "TopUpRow",
    "TopUps",
    "create_job",
    "delete_job",
    "get_rule",
    "list_rules",
    "list_top_ups",
    "top_up_shape",
    "update_job",
]

Con = duckdb.DuckDBPyConnection
TOPPED_UP = "customer_meter.topped_up"
_DAY_US = 86_400 * 1_000_000
_PERIOD_US = 32 * _DAY_US  # longer than any period (a month)


@dataclass(frozen=True, slots=True)
class RuleRow:
    id: str
    organization_id: str
    meter_id: str
    customer_id: str | None  # None: every customer of the meter
    threshold: float
    units: int
    max_per_period: int
    period: Period
    priority: int
    expires_in_days: int | None
    refused_reason: str | None
    refused_at_us: int | None
    created_at_us: int
    modified_at_us: int


@dataclass(frozen=True, slots=True)
class TopUpRow:
    id: str
    organization_id: str
    rule_id: str
    customer_id: str
    meter_id: str
    period: str
    number: int
    units: int
    grant_id: str
    window_seq: int
    place: int
    event_seq: int
    balance_before: float
    created_at_us: int


_RULE = (
    "id::VARCHAR, organization_id::VARCHAR, meter_id::VARCHAR, customer_id::VARCHAR, threshold,"
    " units, max_per_period, period, priority, expires_in_days, refused_reason,"
    " epoch_us(refused_at), epoch_us(created_at), epoch_us(modified_at)"
)
_TOP_UP = (
    "id::VARCHAR, organization_id::VARCHAR, rule_id::VARCHAR, customer_id::VARCHAR,"
    " meter_id::VARCHAR, period, number, units, grant_id::VARCHAR, window_seq, place, event_seq,"
    " balance_before, epoch_us(created_at)"
)


def _rule(r: tuple[Any, ...]) -> RuleRow:
    return RuleRow(
        r[0], r[1], r[2], r[3], float(r[4]), int(r[5]), int(r[6]), r[7], int(r[8]),
        None if r[9] is None else int(r[9]), r[10], None if r[11] is None else int(r[11]),
        int(r[12]), int(r[13]),
    )  # fmt: skip


def _top_up(r: tuple[Any, ...]) -> TopUpRow:
    return TopUpRow(
        r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), r[8], int(r[9]), int(r[10]),
        int(r[11]), float(r[12]), int(r[13]),
    )  # fmt: skip


# ---- the API's --------------------------------------------------------------------------------

_COUNT = "SELECT count(*) FROM top_up_rules WHERE organization_id = ?::UUID AND deleted_at IS NULL"


def create_job(
    organization_id: str,
    data: TopUpRuleCreate,
    now_us: int,
    limits: TenantLimits = quotas.DEFAULTS,
    *,
    rule_id: str,
) -> Job[RuleRow]:
    """A rule; 422 naming `meter_id` for a meter without customer meters or whose consumption
    does not add up, `units` for a top-up that would loop (`loop_error`); 409 past the limit."""

    def job(tx: Tx) -> RuleRow:
        con = tx.con
        quotas.check(con, limits, quotas.TOP_UP_RULES, _COUNT, [organization_id])
        customer_id = rule_customer(
            con, organization_id, data.customer_id, data.external_customer_id
        )
        meter = _toppable(con, organization_id, str(data.meter_id))
        _refuse_loop(con, meter, data.units)
        con.execute(
            "INSERT INTO top_up_rules VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, ?, ?, ?, ?, ?,"
            " ?, NULL, NULL, make_timestamptz(?), make_timestamptz(?), NULL)",
            [
                rule_id,
                organization_id,
                meter.id,
                customer_id,
                data.threshold,
                data.units,
                data.max_per_period,
                data.period,
                data.priority,
                data.expires_in_days,
                now_us,
                now_us,
            ],
        )
        _forget(tx.live, organization_id)
        found = get_rule(con, organization_id, rule_id)
        assert found is not None
        return found

    return job


def update_job(
    organization_id: str, rule_id: str, data: TopUpRuleUpdate, now_us: int
) -> Job[RuleRow]:
    """The fields given changed (a rule's meter and customer stay); `units` checked again."""
    given = {name: getattr(data, name) for name in data.model_fields_set}

    def job(tx: Tx) -> RuleRow:
        con = tx.con
        rule = get_rule(con, organization_id, rule_id)
        if rule is None:
            raise NotFound("Top-up rule not found")
        if "units" in given:
            meter = get_meter(con, organization_id, rule.meter_id)
            assert meter is not None
            _refuse_loop(con, meter, given["units"])
        if given:
            sets = ", ".join(f"{name} = ?" for name in sorted(given))
            con.execute(
                f"UPDATE top_up_rules SET {sets}, modified_at = make_timestamptz(?)"  # noqa: S608 - names of the model's fields
                " WHERE id = ?::UUID",
                [*(given[name] for name in sorted(given)), now_us, rule_id],
            )
            _forget(tx.live, organization_id)
        found = get_rule(con, organization_id, rule_id)
        assert found is not None
        return found

    return job


def delete_job(organization_id: str, rule_id: str, now_us: int) -> Job[None]:
    def job(tx: Tx) -> None:
        if get_rule(tx.con, organization_id, rule_id) is None:
            raise NotFound("Top-up rule not found")
        tx.con.execute(
            "UPDATE top_up_rules SET deleted_at = make_timestamptz(?) WHERE id = ?::UUID",
            [now_us, rule_id],
        )
        _forget(tx.live, organization_id)

    return job


def _toppable(con: Con, organization_id: str, meter_id: str) -> MeterRow:
    meter = get_meter(con, organization_id, meter_id)
    if meter is None or meter.archived_at_us is not None:
        missing = FieldError("meter_not_found", ("body", "meter_id"), "Meter not found.", meter_id)
        raise ValidationFailed([missing], business=True)
    if (unkept := without_ledger(meter)) is not None:
        raise ValidationFailed([unkept], business=True)
    if meter.aggregation.func not in TOPPABLE:
        why = (
            f"top-ups apply to count and sum meters (whose consumption a credit offsets unit"
            f" for unit); this meter aggregates with {meter.aggregation.func}"
        )
        raise ValidationFailed([FieldError("value_error", ("body", "meter_id"), why, meter_id)])
    return meter


def _refuse_loop(con: Con, meter: MeterRow, units: int) -> None:
    why = loop_error(meter.aggregation.func, units, largest_quantity(con, meter))
    if why is not None:
        raise ValidationFailed([FieldError("value_error", ("body", "units"), why, units)])


def largest_quantity(con: Con, meter: MeterRow) -> float:
    """The largest quantity one event of the meter has consumed (its rollups' highest; 0 for
    none, and for a count meter, whose events consume 1 each)."""
    if meter.aggregation.func == "count":
        return 0.0
    row = first_row(
        con, "SELECT max(high) FROM all_rollups WHERE meter_id = ?::UUID AND events > 0", [meter.id]
    )
    return 0.0 if row is None or row[0] is None else max(float(row[0]), 0.0)


def _forget(live: Live, organization_id: str) -> None:
    live.feature(TopUps).rules.pop(organization_id, None)  # read again when next needed


def get_rule(con: Con, organization_id: str, rule_id: str) -> RuleRow | None:
    row = first_row(
        con,
        f"SELECT {_RULE} FROM top_up_rules WHERE organization_id = ?::UUID"  # noqa: S608
        " AND id = TRY_CAST(? AS UUID) AND deleted_at IS NULL",
        [organization_id, rule_id],
    )
    return None if row is None else _rule(row)


def list_rules(
    con: Con,
    organization_id: str,
    meter_id: str | None,
    customer_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[RuleRow], int]:
    """The organization's rules, oldest first; with `customer_id`, those that apply to the
    customer (its own, and those for every customer)."""
    where = "organization_id = ?::UUID AND deleted_at IS NULL"
    params: list[Any] = [organization_id]
    if meter_id is not None:
        where += " AND meter_id = ?::UUID"
        params.append(meter_id)
    if customer_id is not None:
        where += " AND (customer_id IS NULL OR customer_id = ?::UUID)"
        params.append(customer_id)
    total = con.execute(
        f"SELECT count(*) FROM top_up_rules WHERE {where}",  # noqa: S608 (constants)
        params,
    ).fetchall()[0][0]
    rows = con.execute(
        f"SELECT {_RULE} FROM top_up_rules WHERE {where}"  # noqa: S608 (constants)
        " ORDER BY created_at, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return [_rule(r) for r in rows], int(total)


def list_top_ups(
    con: Con,
    organization_id: str,
    rule_id: str | None,
    meter_id: str | None,
    customer_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[TopUpRow], int]:
    """The organization's top-ups, newest first."""
    where = "organization_id = ?::UUID"
    params: list[Any] = [organization_id]
    for column, value in (
        ("rule_id", rule_id),
        ("meter_id", meter_id),
        ("customer_id", customer_id),
    ):
        if value is not None:
            where += f" AND {column} = ?::UUID"
            params.append(value)
    total = con.execute(
        f"SELECT count(*) FROM top_ups WHERE {where}",  # noqa: S608 (constants)
        params,
    ).fetchall()[0][0]
    rows = con.execute(
        f"SELECT {_TOP_UP} FROM top_ups WHERE {where}"  # noqa: S608 (constants)
        # As `api.fan_out.newest_first` merges shards' pages: created_at is the event's
        # ingested_at, the same wherever the event is applied.
        " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return [_top_up(r) for r in rows], int(total)


# ---- applying events --------------------------------------------------------------------------


def _rules(con: Con, live: Live, organization_id: str) -> dict[str, list[RuleRow]]:
    """The organization's rules per meter, in the order made (read once, held)."""
    held = live.feature(TopUps).rules
    found = held.get(organization_id)
    if found is None:
        rows, _ = list_rules(con, organization_id, None, None, 2**31 - 1, 0)
        found = {}
        for rule in rows:
            found.setdefault(rule.meter_id, []).append(rule)
        held[organization_id] = found
    return found


@dataclass(slots=True)
class _Due:
    """A top-up decided at an event (`seq`, ingested at `at_us`, `place`d in its window)."""

    id: str
    rule: RuleRow
    customer_id: str
    meter: MeterRow
    period: str
    number: int
    window_seq: int
    place: int
    seq: int
    at_us: int
    balance: float  # available after the event, before the top-up
    consumed: float
    credited: int  # after the top-up
    replayed: bool  # stored already (its event applied again after a crash)


@dataclass(slots=True)
class Decided:
    """What `decide` found in a batch: the top-ups due, and the rules refused at an event."""

    due: list[_Due] = field(default_factory=list)
    refused: list[tuple[RuleRow, str, int]] = field(default_factory=list)  # (rule, why, at)


def decide(con: Con, live: Live, ev: Evaluated, events: pa.Table) -> Decided | None:
    """The top-ups a batch's events make (before its alerts record the customer meters'
    values after it: these are read from before the batch). None: the organization has no
    rules on the batch's meters.

    Per customer meter, its running available balance is computed at once (arrays); only one
    that would fall below a rule's threshold is walked event by event (`Walk`)."""
    rules = _rules(con, live, ev.organization_id)
    if not rules:
        return None
    decided = Decided()
    times: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
    for i, meter in enumerate(ev.meters):
        meter_rules = rules.get(meter.id)
        if not meter_rules or meter.aggregation.func not in TOPPABLE:
            continue
        values = ev.values([i])
        rows = values.filter(pc.is_valid(values.column(f"v{i}")))
        if not rows.num_rows:
            continue
        if times is None:
            seqs = numpy(events.column("seq"), np.int64)
            order = np.argsort(seqs)
            ingested = numpy(pc.cast(events.column("ingested_at"), pa.int64()), np.int64)
            times = (seqs[order], ingested[order])
        names, _ = encoded(rows.column("subject"))
        named = live.catalog.customers_of_subjects(con, ev.organization_id, names)
        seq = numpy(rows.column("seq"), np.int64)
        grouped = running.by_customer(
            rows.column("subject"),
            seq,
            named,
            # A rule for every customer watches them all; others, theirs.
            None
            if any(r.customer_id is None for r in meter_rules)
            else {r.customer_id for r in meter_rules},
        )
        watched = grouped.customers
        if not watched:
            continue
        used = (
            np.ones(len(seq), np.float64)
            if meter.aggregation.func == "count"
            else numpy(rows.column(f"v{i}"), np.float64)
        )
        instants = times[1][np.searchsorted(times[0], seq)]
        # Holds read only where the organization may have one active (a superset is known).
        held = (
            hold_tables.held_by_pair(con, [(c.id, meter.id) for c in watched], int(instants.min()))
            if live.feature(hold_tables.HoldKeys).of(ev.organization_id)
            else {}
        )
        func = meter.aggregation.func
        befores = [alert_tables.value(live, key, meter) for key in watched]
        start = np.array([b.credited - b.usage.result(func) for b in befores], np.float64)
        holding = np.array([held.get((c.id, meter.id), 0.0) for c in watched], np.float64)
        # A top-up counts in its period, a month at most: older ones never matter.
        since = int(instants.min()) - _PERIOD_US
        topped = live.feature(TopUps).topped_of(con, meter.id)
        stored = _stored(con, meter.id, [c.id for c in watched if c.id in topped], since)
        windows: dict[int, int] = {}
        ahead: dict[int, list[TopUpRow]] = {}
        taken_back = np.zeros(len(watched), np.float64)
        for k, key in enumerate(watched):
            if key.id in stored:
                windows[k] = window = _window(con, key.id, meter.id)
                # Stored past the window's count: committed by a life of this core that
                # applied these events before a crash (see the module's docstring).
                events_before = befores[k].usage.events
                ahead[k] = [
                    t for t in stored[key.id] if t.window_seq == window and t.place > events_before
                ]
                taken_back[k] = sum(t.units for t in ahead[k])
        # Each customer meter's available balance after each of its events, at once; no
        # top-up can be due unless a consuming event leaves it below some rule's threshold.
        owners, consumed = grouped.owners, used[grouped.order]
        low = start[owners] - grouped.cumsum(consumed) - holding[owners] - taken_back[owners]
        highest = max(r.threshold for r in meter_rules)
        for k in np.unique(owners[(consumed > 0) & (low < highest)]).tolist():
            key = watched[k]
            walk = Walk(
                key,
                meter,
                [r for r in meter_rules if r.customer_id in (None, key.id)],
                befores[k],
                float(holding[k]),
                windows[k] if k in windows else _window(con, key.id, meter.id),
            )
            mine = grouped.rows(k)
            walk.run(
                decided,
                stored.get(key.id, []),
                ahead.get(k, []),
                [(float(used[r]), int(seq[r]), int(instants[r])) for r in mine],
            )
    return decided


@dataclass(slots=True)
class Walk:
    """A customer meter's events walked in order, as the rules say (`meters.topup_rules`)."""

    key: CustomerKey
    meter: MeterRow
    rules: list[RuleRow]
    before: alert_tables.Value
    held: float
    window: int  # the customer meter's reset seq (0: none)

    def run(
        self,
        decided: Decided,
        stored: list[TopUpRow],
        ahead: list[TopUpRow],
        events: list[tuple[float, int, int]],
    ) -> None:
        """`events`: (consumed, seq, ingested at) in order."""
        customer_id, meter = self.key.id, self.meter
        consumed = self.before.usage.result(meter.aggregation.func)
        place = self.before.usage.events
        window = self.window
        credited = self.before.credited - sum(t.units for t in ahead)
        skipped = {t.id for t in ahead}
        counts = Counter((t.rule_id, t.period) for t in stored if t.id not in skipped)
        known = {t.id for t in stored}
        for used, seq, at_us in events:
            consumed += used
            place += 1
            if used <= 0:
                continue  # lowers no balance
            for rule in self.rules:
                available = credited - consumed - self.held
                if available >= rule.threshold:
                    continue
                period = period_key(rule.period, at_us)
                n = counts[(rule.id, period)]
                if n >= rule.max_per_period:
                    continue
                why = outrun_error(rule.units, used)
                if why is not None:
                    decided.refused.append((rule, why, at_us))
                    continue
                counts[(rule.id, period)] = n + 1
                credited += rule.units
                top_up_id = derived_id("top-up", rule.id, customer_id, meter.id, period, str(n + 1))
                decided.due.append(
                    _Due(
                        top_up_id, rule, customer_id, meter, period, n + 1, window, place,
                        seq, at_us, available, consumed, credited, top_up_id in known,
                    )
                )  # fmt: skip


def _window(con: Con, customer_id: str, meter_id: str) -> int:
    row = first_row(
        con,
        "SELECT reset_seq FROM customer_meters WHERE customer_id = ?::UUID AND meter_id = ?::UUID",
        [customer_id, meter_id],
    )
    return 0 if row is None or row[0] is None else int(row[0])


def _stored(
    con: Con, meter_id: str, customer_ids: list[str], since_us: int
) -> dict[str, list[TopUpRow]]:
    """The top-ups since `since_us` of the meter's customer meters of `customer_ids`, per
    customer."""
    if not customer_ids:
        return {}
    rows = con.execute(
        f"SELECT {_TOP_UP} FROM top_ups"  # noqa: S608 - fixed text, values bound
        " WHERE meter_id = ?::UUID AND customer_id IN (SELECT unnest(?::UUID[]))"
        " AND created_at >= make_timestamptz(?)",
        [meter_id, customer_ids, since_us],
    ).fetchall()
    found: dict[str, list[TopUpRow]] = {}
    for r in rows:
        row = _top_up(r)
        found.setdefault(row.customer_id, []).append(row)
    return found


def apply(con: Con, live: Live, decided: Decided | None) -> None:
    """Write what `decide` found (after the batch's alerts): each new top-up's credit, row and
    webhook event, in order; each refusal on its rule."""
    if decided is None:
        return
    made = [(d, _top_up_now(con, live, d)) for d in decided.due if not d.replayed]
    refused = [*decided.refused, *((d.rule, why, d.at_us) for d, why in made if why is not None)]
    for rule, why, at_us in refused:
        con.execute(
            "UPDATE top_up_rules SET refused_reason = ?, refused_at = make_timestamptz(?)"
            " WHERE id = ?::UUID",
            [why, at_us, rule.id],
        )


def _top_up_now(con: Con, live: Live, due: _Due) -> str | None:
    """Credit `due` and write its row and webhook event; why not, if it could not be."""
    rule, meter = due.rule, due.meter
    customer = get_customer(con, meter.organization_id, due.customer_id)
    assert customer is not None
    expires = None if rule.expires_in_days is None else due.at_us + rule.expires_in_days * _DAY_US
    grant = Grant(rule.units, rule.priority, expires, False, due.seq)
    grant_id = derived_id("credit-grant", meter.organization_id, f"top-up:{due.id}")
    if not ledger_tables.top_up(con, live, customer, meter, grant, grant_id, due.at_us):
        return (
            f"the customer meter has {MAX_ACTIVE_GRANTS} active grants, the most it may have"
            " (give the rule no expiry: its grants then add up into one)"
        )
    merged = first_row(
        con,
        "SELECT id::VARCHAR FROM credit_grants WHERE customer_id = ?::UUID AND meter_id = ?::UUID"
        " AND priority = ? AND expires_at IS NOT DISTINCT FROM make_timestamptz(?)"
        " AND NOT rollover AND expired_units IS NULL ORDER BY seq DESC LIMIT 1",
        [customer.id, meter.id, rule.priority, expires],
    )  # the grant it made, or the active one it added to
    row = TopUpRow(
        due.id, meter.organization_id, rule.id, customer.id, meter.id, due.period, due.number,
        rule.units, grant_id if merged is None else merged[0], due.window_seq, due.place,
        due.seq, due.balance, due.at_us,
    )  # fmt: skip
    live.feature(TopUps).topped_of(con, meter.id).add(customer.id)
    con.execute(
        "INSERT INTO top_ups VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, ?::UUID, ?, ?, ?,"
        " ?::UUID, ?, ?, ?, ?, make_timestamptz(?)) ON CONFLICT DO NOTHING",
        [
            row.id, row.organization_id, row.rule_id, row.customer_id, row.meter_id, row.period,
            row.number, row.units, row.grant_id, row.window_seq, row.place, row.event_seq,
            row.balance_before, row.created_at_us,
        ],
    )  # fmt: skip
    webhook_tables.enqueue_many(
        con,
        live,
        meter.organization_id,
        TOPPED_UP,
        [(webhook_id(due.id), payload(row, due.consumed, due.credited))],
        due.at_us,
    )
    return None


def webhook_id(top_up_id: str) -> str:
    """The `customer_meter.topped_up` event's id (its `webhook-id`): named by the top-up."""
    return derived_id("webhook", TOPPED_UP, top_up_id)


def top_up_shape(row: TopUpRow) -> dict[str, Any]:
    """A top-up as the API and the webhook show it (the API's `TopUpShape` declares it)."""
    return {
        "id": row.id,
        "rule_id": row.rule_id,
        "customer_id": row.customer_id,
        "meter_id": row.meter_id,
        "units": row.units,
        "period": row.period,
        "number": row.number,
        "grant_id": row.grant_id,
        "balance_before": row.balance_before,
        "created_at": us_to_iso(row.created_at_us),
    }


def payload(row: TopUpRow, consumed: float, credited: int) -> dict[str, Any]:
    """The `customer_meter.topped_up` event's data: the top-up, and the customer meter right
    after it (the values at its event, every core applying it makes the same)."""
    return {
        "top_up": top_up_shape(row),
        "customer_meter": {
            "customer_id": row.customer_id,
            "meter_id": row.meter_id,
            "consumed_units": consumed,
            "credited_units": credited,
            "balance": credited - consumed,
        },
    }


class TopUps(Feature):
    """Each organization's rules per meter, as `decide` looks them up (read when first
    needed, dropped by a change to them and by a rollback), and per meter the customers it
    topped up (`topped_of`, dropped by a rollback)."""

    def __init__(self) -> None:
        self.rules: dict[str, dict[str, list[RuleRow]]] = {}
        # Per meter, the customers it ever topped up (read once, grown by each top-up): only
        # their stored top-ups are read while applying.
        self.topped: dict[str, set[str]] = {}

    def topped_of(self, con: Con, meter_id: str) -> set[str]:
        found = self.topped.get(meter_id)
        if found is None:
            rows = con.execute(
                "SELECT DISTINCT customer_id::VARCHAR FROM top_ups WHERE meter_id = ?::UUID",
                [meter_id],
            ).fetchall()
            found = self.topped[meter_id] = {str(r[0]) for r in rows}
        return found

    def rollback(self) -> None:
        self.rules.clear()
        self.topped.clear()
