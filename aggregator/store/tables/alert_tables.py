"""SQL for threshold alerts, and their evaluation in the transaction of every change.

An alert fires when a change takes a customer meter's value (consumed units or balance) into
its condition (`ledger_rules.alert_fires`): a `meter.alert` webhook event is written
(`webhook_tables.enqueue_many`) in the same transaction. A change is one ingested event (in
seq order, however many a transaction applies), a credit or a reset. The value before a change
is the one in memory (`Balances`), or this transaction's own, kept in `Alerts.values` by
every change the transaction makes, so a group of jobs sees each change in order. A reset
re-arms: the value before it counts as outside the condition.

What fires, and the event's id (`firing_id`, the webhook-id receivers dedupe by), depend on the
changes only, never on how they were grouped into transactions: an event is named by its place
in its customer meter's window (the reset that opened it, and how many events the window
counts up to it, and how many of its events corrections voided by then: a void re-arms, and
the place is taken again), a credit, reset or correction by a seq it took (its system
event's, or its first new event's). Applying the same events
again (the ingest log's replay at start, a partition read again after a crash) fires the same
alerts under the same ids, which the webhook outbox holds once.

Organizations' alerts are held in memory (`Alerts.watches`, dropped whenever one is created or
deleted), so a batch of an organization without alerts costs nothing more.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import NotFound
from aggregator.store.base import subjects
from aggregator.store.base.arrays import numpy
from aggregator.store.base.meter_rows import MeterRow, get_meter, without_ledger
from aggregator.store.base.rows import first_row
from aggregator.store.engine.catalog import CustomerKey
from aggregator.store.engine.live import Feature, Live
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering import running
from aggregator.store.metering.rollups import Evaluated
from aggregator.store.tables import idempotency, quotas, webhook_tables
from aggregator.store.tables.customer_tables import CustomerRow, rule_customer
from aggregator.store.tables.quotas import TenantLimits
from meters.aggregations import Partial
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import (
    AlertCreate,
    AlertMetric,
    AlertOperator,
    alert_fires,
    alert_holds,
)

if TYPE_CHECKING:
    from aggregator.store.engine.balances import Balances

__all__ = [
    "AlertRow",
    "Firing",
    "create_job",
    "delete_job",
    "get_alert",
    "list_alerts",
]

Con = duckdb.DuckDBPyConnection


@dataclass(frozen=True, slots=True)
class AlertRow:
    id: str
    organization_id: str
    meter_id: str
    customer_id: str | None
    metric: AlertMetric
    operator: AlertOperator
    threshold: float
    external_id: str
    created_at_us: int


@dataclass(slots=True)
class Value:
    """A customer meter's usage and credits, as a transaction left them."""

    usage: Partial
    credited: int

    def of(self, metric: AlertMetric, func: str) -> float:
        consumed = self.usage.result(func)
        return consumed if metric == "consumed_units" else self.credited - consumed


# What a `meter.alert` event's `data` is made of: the alert, the customer meter (Polar's
# CustomerMeter with the values after the change, holds as of the change's time: every core
# applying it makes the same). Set by the composition (the API's shapes).
Payload = Callable[[Con, "Balances", list["Firing"], int], list[dict[str, Any]]]

_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, meter_id::VARCHAR, customer_id::VARCHAR, metric,"
    " operator, threshold, external_id, epoch_us(created_at)"
)


def _row(r: tuple[Any, ...]) -> AlertRow:
    return AlertRow(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]), r[7], int(r[8]))


# ---- the API's --------------------------------------------------------------------------------


_ALERTS = "SELECT count(*) FROM meter_alerts WHERE organization_id = ?::UUID AND deleted_at IS NULL"


def create_job(
    organization_id: str,
    data: AlertCreate,
    now_us: int,
    limits: TenantLimits = quotas.DEFAULTS,
    *,
    alert_id: str,
) -> Job[tuple[AlertRow, bool]]:
    """The alert, and whether this call made it (False: its external_id made it before)."""
    request = idempotency.digest(data)

    def job(tx: Tx) -> tuple[AlertRow, bool]:
        con = tx.con
        used = idempotency.recall(con, organization_id, "alert", data.external_id, request)
        if used is not None:
            found = _by_external_id(con, organization_id, data.external_id)
            assert found is not None
            return found, False
        quotas.check(con, limits, quotas.ALERTS, _ALERTS, [organization_id])
        customer_id = rule_customer(
            con, organization_id, data.customer_id, data.external_customer_id
        )
        meter = get_meter(con, organization_id, str(data.meter_id))
        if meter is None or meter.archived_at_us is not None:
            raise ValidationFailed(
                [
                    FieldError(
                        "meter_not_found",
                        ("body", "meter_id"),
                        "Meter not found.",
                        str(data.meter_id),
                    )
                ],
                business=True,
            )
        if (unkept := without_ledger(meter)) is not None:
            raise ValidationFailed([unkept], business=True)
        alert = AlertRow(
            alert_id,
            organization_id,
            meter.id,
            customer_id,
            data.metric,
            data.operator,
            data.threshold,
            data.external_id,
            now_us,
        )
        con.execute(
            "INSERT INTO meter_alerts VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, ?, ?, ?, ?,"
            " make_timestamptz(?), NULL)",
            [
                alert.id,
                organization_id,
                alert.meter_id,
                customer_id,
                alert.metric,
                alert.operator,
                alert.threshold,
                alert.external_id,
                now_us,
            ],
        )
        idempotency.remember(
            con, organization_id, "alert", data.external_id, request, alert.id, now_us
        )
        _forget_alerts(tx.live, organization_id)
        return alert, True

    return job


def delete_job(organization_id: str, alert_id: str, now_us: int) -> Job[None]:
    def job(tx: Tx) -> None:
        if get_alert(tx.con, organization_id, alert_id) is None:
            raise NotFound("Alert not found")
        tx.con.execute(
            "UPDATE meter_alerts SET deleted_at = make_timestamptz(?) WHERE id = ?::UUID",
            [now_us, alert_id],
        )
        _forget_alerts(tx.live, organization_id)

    return job


def _forget_alerts(live: Live, organization_id: str) -> None:
    live.feature(Alerts).watches.pop(organization_id, None)  # read again when next needed


def get_alert(con: Con, organization_id: str, alert_id: str) -> AlertRow | None:
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM meter_alerts WHERE organization_id = ?::UUID"  # noqa: S608
        " AND id = TRY_CAST(? AS UUID) AND deleted_at IS NULL",
        [organization_id, alert_id],
    )
    return None if row is None else _row(row)


def _by_external_id(con: Con, organization_id: str, external_id: str) -> AlertRow | None:
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM meter_alerts WHERE organization_id = ?::UUID"  # noqa: S608
        " AND external_id = ?",
        [organization_id, external_id],
    )
    return None if row is None else _row(row)


def list_alerts(
    con: Con, organization_id: str, meter_id: str | None, limit: int, offset: int
) -> tuple[list[AlertRow], int]:
    where = "organization_id = ?::UUID AND deleted_at IS NULL"
    params: list[Any] = [organization_id]
    if meter_id is not None:
        where += " AND meter_id = ?::UUID"
        params.append(meter_id)
    total = con.execute(
        f"SELECT count(*) FROM meter_alerts WHERE {where}",  # noqa: S608 (constants)
        params,
    ).fetchall()[0][0]
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM meter_alerts WHERE {where}"  # noqa: S608 (constants)
        " ORDER BY created_at, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return [_row(r) for r in rows], int(total)


@dataclass(frozen=True, slots=True)
class Watch:
    """An organization's alerts, as evaluation looks them up: per meter, and which customer
    references each meter's per-customer alerts watch (a meter with an alert for every
    customer watches all)."""

    by_meter: dict[str, list[AlertRow]]
    everyone: frozenset[str]  # meters with an alert for every customer
    subjects: dict[str, pa.Array[Any]]  # meter -> the watched customers' references


def _watch(con: Con, live: Live, organization_id: str) -> Watch:
    watches = live.feature(Alerts).watches
    held = watches.get(organization_id)
    if held is None:
        rows = con.execute(
            f"SELECT {_COLUMNS} FROM meter_alerts WHERE organization_id = ?::UUID"  # noqa: S608
            " AND deleted_at IS NULL",
            [organization_id],
        ).fetchall()
        by_meter: dict[str, list[AlertRow]] = {}
        watched: dict[str, set[str]] = {}
        for alert in map(_row, rows):
            by_meter.setdefault(alert.meter_id, []).append(alert)
            if alert.customer_id is None:
                continue
            customer = live.catalog.customer(con, organization_id, alert.customer_id)
            if customer is not None:
                watched.setdefault(alert.meter_id, set()).update(subjects.of_customer(customer))
        everyone = frozenset(
            m for m, alerts in by_meter.items() if any(a.customer_id is None for a in alerts)
        )
        held = watches[organization_id] = Watch(
            by_meter,
            everyone,
            {m: pa.array(sorted(refs), pa.string()) for m, refs in watched.items()},
        )
    return held


# ---- evaluation ------------------------------------------------------------------------------

# A customer meter's events in a batch, in order: their numbers, or a unique meter's values.
Contributions = npt.NDArray[np.float64] | list[str]

# The namespace of `meter.alert` events' ids (`firing_id`).
_FIRINGS = uuid.uuid5(uuid.NAMESPACE_URL, "meterline:meter.alert")


def firing_id(alert: AlertRow, meter: MeterRow, customer_id: str, cause: str) -> str:
    """The id (the webhook-id of every delivery) of the `meter.alert` event that `cause` fired
    on a customer meter: the same whenever the same change is applied again."""
    key = f"{alert.id}/{meter.id}/{meter.version}/{customer_id}/{cause}"
    return str(uuid.uuid5(_FIRINGS, key))


def on_usage(con: Con, live: Live, evaluated: Evaluated) -> None:
    """Evaluate the organization's alerts on the customer meters a batch's usage changed, event
    by event in seq order: an alert fires at the event that takes the value into its condition,
    and is named by that event's place in the customer meter's window (`_crossings`). How
    events are grouped into transactions then changes neither what fires nor its id: replaying
    the ingest log at start (a request at a time) or reading a partition again writes nothing
    twice."""
    org = evaluated.organization_id
    watch = _watch(con, live, org)
    watched = [
        (meter, rows)
        for i, meter in enumerate(evaluated.meters)
        if meter.id in watch.by_meter
        and (rows := _watched_events(evaluated.values([i]), f"v{i}", meter.id, watch)).num_rows
    ]
    if not watched:
        return
    names = sorted({str(s) for _, rows in watched for s in pc.unique(rows["subject"]).to_pylist()})
    named = live.catalog.customers_of_subjects(con, org, names)
    crossed: list[_Crossing] = []
    for meter, rows in watched:
        unique = meter.aggregation.func == "unique"
        for customer, contributions, times in _per_customer(rows, named, unique):
            crossed += _crossings(live, watch, customer, meter, contributions, times)
    if crossed:
        windows = _windows(con, {(c.customer_id, c.meter.id) for c in crossed})
        fired = [c.firing(_cause(con, org, c, windows)) for c in crossed]
        _send(con, live, org, fired, evaluated.at_us)


def _cause(
    con: Con, organization_id: str, crossing: _Crossing, windows: dict[tuple[str, str], int]
) -> str:
    """What names an event's firing: its window and its place there, and, once corrections
    voided some of the window's events, how many: a place is taken again after a void (the
    window counts fewer events), and the alert it fires again, re-armed, is another firing."""
    window = windows.get((crossing.customer_id, crossing.meter.id), 0)
    voided = _voided_in_window(con, organization_id, crossing.customer_id, window)
    cause = f"usage/{window}/{crossing.place}"
    return f"{cause}/{voided}" if voided else cause


def _voided_in_window(con: Con, organization_id: str, customer_id: str, reset_seq: int) -> int:
    """The customer's user events applied after the reset `reset_seq` and voided since."""
    voided = "FROM voided_events WHERE organization_id = ?::UUID AND seq > ?"
    if first_row(con, f"SELECT 1 {voided} LIMIT 1", [organization_id, reset_seq]) is None:
        return 0  # no correction since: no events to read
    row = first_row(
        con,
        f"SELECT count(*) FROM all_events e, customers c WHERE e.seq IN (SELECT seq {voided})"  # noqa: S608 - fixed text, values bound
        " AND e.source = 'user' AND c.id = ?::UUID"
        " AND (e.customer_id = c.id OR e.external_customer_id = c.external_id)",
        [organization_id, reset_seq, customer_id],
    )
    return int(row[0]) if row else 0


def _watched_events(values: pa.Table, column: str, meter_id: str, watch: Watch) -> pa.Table:
    """(subject, seq, contribution, at_us) of the events in the meter (`column` of `values`)
    whose customer reference an alert watches."""
    mask = pc.is_valid(values[column])
    if meter_id not in watch.everyone:
        refs = watch.subjects.get(meter_id, pa.array([], pa.string()))
        mask = pc.and_(mask, pc.is_in(values["subject"], value_set=refs))
    return values.select(["subject", "seq", column, "at_us"]).filter(mask)


def _per_customer(
    rows: pa.Table, named: dict[str, CustomerKey], unique: bool
) -> list[tuple[CustomerKey, Contributions, npt.NDArray[np.int64]]]:
    """Each customer's contributions in `rows` (`_watched_events`), in seq order
    (`running.by_customer`): numbers, or a unique meter's values; and their events' instants."""
    grouped = running.by_customer(rows["subject"], numpy(rows["seq"], np.int64), named)
    column = rows.column(2)
    contributions: Contributions = (
        list(map(str, column.take(grouped.order).to_pylist()))
        if unique
        else numpy(column, np.float64)[grouped.order]
    )
    times = numpy(rows.column(3), np.int64)[grouped.order]
    starts = grouped.starts.tolist()
    return [
        (customer, contributions[start:end], times[start:end])
        for customer, start, end in zip(
            grouped.customers, starts, grouped.ends.tolist(), strict=True
        )
    ]


@dataclass(frozen=True, slots=True)
class _Crossing:
    """An alert's condition entered at the event `place`d so in its customer meter's window
    (the number of events it counts by then; a unique meter's: of distinct values)."""

    alert: AlertRow
    customer_id: str
    meter: MeterRow
    consumed: float
    credited: int
    place: int

    def firing(self, cause: str) -> Firing:
        event_id = firing_id(self.alert, self.meter, self.customer_id, cause)
        return Firing(
            self.alert, self.customer_id, self.meter, self.consumed, self.credited, event_id
        )


def _crossings(
    live: Live,
    watch: Watch,
    customer: CustomerKey,
    meter: MeterRow,
    contributions: Contributions,
    times: npt.NDArray[np.int64],
) -> list[_Crossing]:
    """The alerts that a customer meter's events (their `contributions`, in order) fire, each
    at the event that enters its condition. The place of an event in the window is stable:
    whatever the grouping, the events before it in the window are the same, and held (in
    `Balances`, in DuckDB) or applied before it."""
    customer_id = customer.id
    before = value(live, customer, meter)
    func = meter.aggregation.func
    if isinstance(contributions, list):
        keys = live.balances.value_keys(meter.id, contributions)
        consumed, places, usage = running.running_unique(before.usage, keys)
    else:
        consumed, places, usage = running.running(func, before.usage, contributions, times)
    _record(live, customer_id, meter, Value(usage, before.credited))
    start = before.usage.result(func)
    crossed: list[tuple[int, int, _Crossing]] = []
    for n, alert in enumerate(watch.by_meter.get(meter.id, [])):
        if alert.customer_id not in (None, customer_id):
            continue
        balance = alert.metric == "balance"
        holds = _holding(alert, before.credited - consumed if balance else consumed)
        if not holds.any():
            continue
        entered = holds.copy()
        entered[1:] &= ~holds[:-1]
        entered[0] &= not alert_holds(
            alert.operator, alert.threshold, before.credited - start if balance else start
        )
        for at in np.flatnonzero(entered).tolist():
            crossing = _Crossing(
                alert, customer_id, meter, float(consumed[at]), before.credited, int(places[at])
            )
            crossed.append((at, n, crossing))
    return [c for _, _, c in sorted(crossed, key=lambda c: (c[0], c[1]))]


def _holding(alert: AlertRow, values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """`alert_holds` of each of `values`, at once (its comparison works on arrays)."""
    held: Any = alert_holds(alert.operator, alert.threshold, values)  # type: ignore[arg-type]
    return np.asarray(held, np.bool_)


def _windows(con: Con, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Which window each (customer, meter) is in: the seq of its latest reset (none: 0)."""
    customers = sorted({c for c, _ in pairs})
    meters = sorted({m for _, m in pairs})
    rows = con.execute(
        "SELECT customer_id::VARCHAR, meter_id::VARCHAR, reset_seq FROM customer_meters"
        " WHERE customer_id IN (SELECT unnest(?::UUID[]))"
        " AND meter_id IN (SELECT unnest(?::UUID[]))",
        [customers, meters],
    ).fetchall()
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


def _record(live: Live, customer_id: str, meter: MeterRow, after: Value) -> None:
    """A customer meter as this transaction leaves it: what the next change in the same
    transaction starts from, and announced to those watching its organization."""
    live.feature(Alerts).values[(meter.id, customer_id)] = after
    live.changed(meter.organization_id, meter.id, subjects.of_id(customer_id))


def value(live: Live, customer: CustomerKey | CustomerRow, meter: MeterRow) -> Value:
    """The customer meter as this transaction has it so far."""
    held = live.feature(Alerts).values.get((meter.id, customer.id))
    if held is not None:
        return held
    usage = live.balances.usage(meter.id, subjects.of_customer(customer)).partial
    credits = live.balances.credits(customer.id, meter.id)
    return Value(usage, credits.credited if credits else 0)


def on_ledger_change(
    con: Con,
    live: Live,
    customer: CustomerRow | CustomerKey,
    meter: MeterRow,
    before: Value | None,
    after: Value,
    at_us: int,
    seq: int,
) -> None:
    """Evaluate the alerts on a credit's or reset's change (`before` None: a reset, which
    re-arms them), whose system event took `seq` (what names the events it fires)."""
    watch = _watch(con, live, customer.organization_id)
    _record(live, customer.id, meter, after)
    func = meter.aggregation.func
    fired = []
    for alert in watch.by_meter.get(meter.id, []):
        if alert.customer_id not in (None, customer.id):
            continue
        old = None if before is None else before.of(alert.metric, func)
        if alert_fires(alert.operator, alert.threshold, old, after.of(alert.metric, func)):
            event_id = firing_id(alert, meter, customer.id, f"change/{seq}")
            consumed = after.usage.result(func)
            fired.append(Firing(alert, customer.id, meter, consumed, after.credited, event_id))
    _send(con, live, customer.organization_id, fired, at_us)


@dataclass(frozen=True, slots=True)
class Firing:
    """An alert a change fired, with the customer meter's values after the change, and the id
    of its event (`firing_id`)."""

    alert: AlertRow
    customer_id: str
    meter: MeterRow
    consumed: float
    credited: int
    event_id: str


def _send(con: Con, live: Live, organization_id: str, fired: list[Firing], at_us: int) -> None:
    """Write the events of what fired, with their data made in one go (a batch may fire for
    many customers at once); one whose id exists already (its change applied again) is left
    out (`webhook_tables.enqueue_many`)."""
    if not fired:
        return
    data = live.feature(Alerts).payload(con, live.balances, fired, at_us)
    webhook_tables.enqueue_many(
        con,
        live,
        organization_id,
        "meter.alert",
        [(f.event_id, d) for f, d in zip(fired, data, strict=True)],
        at_us,
    )


def basic_payload(
    con: Con, balances: Balances, fired: list[Firing], at_us: int
) -> list[dict[str, Any]]:
    """`meter.alert` events' data without the API's shapes (the store alone, as in its tests)."""
    return [
        {
            "alert": {"id": f.alert.id, "external_id": f.alert.external_id},
            "customer_meter": {
                "customer_id": f.customer_id,
                "meter_id": f.meter.id,
                "consumed_units": f.consumed,
                "credited_units": f.credited,
                "balance": f.credited - f.consumed,
            },
        }
        for f in fired
    ]


class Alerts(Feature):
    """What alerts keep in memory: each organization's alerts as evaluation looks them up
    (`watches`: read when first needed, dropped by a change to them and by a rollback), each
    customer meter as the transaction has left it so far (`values`, what `value` reads), and
    how a `meter.alert` event's data is made (`payload`: the composition gives the API's
    shapes, `basic_payload` otherwise)."""

    def __init__(self, payload: Payload = basic_payload) -> None:
        self.payload = payload
        self.watches: dict[str, Watch] = {}
        self.values: dict[tuple[str, str], Value] = {}

    def begin(self) -> None:
        self.values = {}

    def rollback(self) -> None:
        self.watches.clear()
        self.values = {}
