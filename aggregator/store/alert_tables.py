"""SQL for threshold alerts, and their evaluation in the transaction of every change.

An alert fires when a change takes a customer meter's value (consumed units or balance) into
its condition (`ledger_rules.alert_fires`): a `meter.alert` webhook event is written
(`webhook_tables.enqueue`) in the same transaction. The value before a change is the one in
memory (`Balances`), or this transaction's own, kept in `Live.alert_values` by every change
the transaction makes (ingested usage, credits, resets), so a group of jobs sees each change
in order. A reset re-arms: the value before it counts as outside the condition.

Organizations' alerts are held in memory (`Live.alerts`, dropped whenever one is created or
deleted), so a batch of an organization without alerts costs nothing more.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import NotFound
from aggregator.store import idempotency, quotas, subjects, webhook_tables
from aggregator.store.catalog import CustomerKey
from aggregator.store.customer_tables import CustomerRow, find_customer
from aggregator.store.meter_tables import MeterRow, get_meter
from aggregator.store.quotas import TenantLimits
from aggregator.store.rollups import Evaluated
from aggregator.store.rows import first_row
from aggregator.store.writer import Job, Tx
from meters.aggregations import Partial
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import AlertCreate, AlertMetric, AlertOperator, alert_fires

if TYPE_CHECKING:
    from aggregator.store.balances import Balances
    from aggregator.store.live import Live

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
# CustomerMeter with the values after the change). Set by the composition (the API's shapes).
Payload = Callable[[Con, "Balances", list["Firing"]], list[dict[str, Any]]]

_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, meter_id::VARCHAR, customer_id::VARCHAR, metric,"
    " operator, threshold, external_id, epoch_us(created_at)"
)


def _row(r: tuple[Any, ...]) -> AlertRow:
    return AlertRow(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]), r[7], int(r[8]))


# ---- the API's --------------------------------------------------------------------------------


_ALERTS = "SELECT count(*) FROM meter_alerts WHERE organization_id = ?::UUID AND deleted_at IS NULL"


def create_job(
    organization_id: str, data: AlertCreate, now_us: int, limits: TenantLimits = quotas.DEFAULTS
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
        customer_id = _customer(con, organization_id, data)
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
        alert = AlertRow(
            str(uuid.uuid4()),
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


def _customer(con: Con, organization_id: str, data: AlertCreate) -> str | None:
    if data.customer_id is None and data.external_customer_id is None:
        return None  # every customer of the meter
    customer, missing = find_customer(
        con, organization_id, data.customer_id, data.external_customer_id
    )
    if missing is not None:
        raise ValidationFailed([missing], business=True)
    assert customer is not None
    return customer.id


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
    live.alerts.pop(organization_id, None)  # read again by the next change (this one's too)


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
    held = live.alerts.get(organization_id)
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
        held = live.alerts[organization_id] = Watch(
            by_meter,
            everyone,
            {m: pa.array(sorted(refs), pa.string()) for m, refs in watched.items()},
        )
    return held


# ---- evaluation ------------------------------------------------------------------------------


def on_usage(con: Con, live: Live, evaluated: Evaluated, batch: int) -> None:
    """Evaluate the organization's alerts on the customer meters a batch's usage changed.
    `batch` (its first seq) names each event fired: the ingest log's replay of the batch at
    start then writes none twice."""
    org = evaluated.organization_id
    watch = _watch(con, live, org)
    meters = {m.id: m for m in evaluated.meters if m.id in watch.by_meter}
    if not meters:
        return
    deltas: dict[tuple[str, str], Partial] = {}
    customers: dict[str, CustomerKey] = {}
    tables = [(evaluated.ledger, False), (evaluated.ledger_values, True)]
    rows = [
        (row, unique)
        for table, unique in tables
        for meter_id in meters
        for row in _watched_rows(table, meter_id, watch)
    ]
    named = live.catalog.customers_of_subjects(con, org, sorted({r["subject"] for r, _ in rows}))
    unique_rows = [row for row, unique in rows if unique]
    keys = iter(_value_keys(live, unique_rows))
    for row, unique in rows:
        customer = named.get(row["subject"])
        key = next(keys) if unique else None
        if customer is None:  # an external id no customer has: no customer meter
            continue
        customers[customer.id] = customer
        delta = deltas.setdefault((row["meter_id"], customer.id), Partial())
        if unique:
            delta.values.add(key)
        else:
            delta.add(row["events"], row["total"], row["low"], row["high"])
    fired: list[Firing] = []
    for (meter_id, customer_id), delta in deltas.items():
        meter = meters[meter_id]
        before = value(live, customers[customer_id], meter)
        after = Value(_merged(before.usage, delta), before.credited)
        fired += _changed(live, watch, customer_id, meter, before, after, batch)
    _send(con, live, org, fired, evaluated.at_us)


def _watched_rows(table: pa.Table, meter_id: str, watch: Watch) -> list[dict[str, Any]]:
    """The rows of `table` for `meter_id` whose customer reference an alert watches."""
    if table.num_rows == 0:
        return []
    mask = pc.equal(table.column("meter_id"), pa.scalar(meter_id, pa.string()))
    if meter_id not in watch.everyone:
        refs = watch.subjects.get(meter_id, pa.array([], pa.string()))
        mask = pc.and_(mask, pc.is_in(table.column("subject"), value_set=refs))
    return list(table.filter(mask).to_pylist())


def _value_keys(live: Live, rows: list[dict[str, Any]]) -> list[Hashable]:
    """Each row's value keyed as the balances key it (per meter)."""
    keys: list[Hashable] = []
    for row in rows:
        keys += live.balances.value_keys(str(row["meter_id"]), [row["value"]])
    return keys


def _merged(usage: Partial, delta: Partial) -> Partial:
    merged = Partial(usage.events, usage.total, usage.low, usage.high, set(usage.values))
    merged.merge(delta)
    return merged


def value(live: Live, customer: CustomerKey | CustomerRow, meter: MeterRow) -> Value:
    """The customer meter as this transaction has it so far."""
    held = live.alert_values.get((meter.id, customer.id))
    if held is not None:
        return held
    usage = live.balances.usage(meter.id, subjects.of_customer(customer)).partial
    credits = live.balances.credits(customer.id, meter.id)
    return Value(usage, credits.credited if credits else 0)


def on_ledger_change(
    con: Con,
    live: Live,
    customer: CustomerRow,
    meter: MeterRow,
    before: Value | None,
    after: Value,
    at_us: int,
) -> None:
    """Evaluate the alerts on a credit's or reset's change (`before` None: a reset, which
    re-arms them)."""
    watch = _watch(con, live, customer.organization_id)
    fired = _changed(live, watch, customer.id, meter, before, after)
    _send(con, live, customer.organization_id, fired, at_us)


@dataclass(frozen=True, slots=True)
class Firing:
    """An alert a change fired, with the customer meter's values after the change."""

    alert: AlertRow
    customer_id: str
    meter: MeterRow
    consumed: float
    credited: int
    event_id: str | None  # set for changes that can be applied again (replayed ingest)


def _changed(
    live: Live,
    watch: Watch,
    customer_id: str,
    meter: MeterRow,
    before: Value | None,
    after: Value,
    batch: int | None = None,
) -> list[Firing]:
    live.alert_values[(meter.id, customer_id)] = after
    func = meter.aggregation.func
    fired = []
    for alert in watch.by_meter.get(meter.id, []):
        if alert.customer_id not in (None, customer_id):
            continue
        old = None if before is None else before.of(alert.metric, func)
        if alert_fires(alert.operator, alert.threshold, old, after.of(alert.metric, func)):
            event_id = (
                None
                if batch is None
                else str(uuid.uuid5(uuid.NAMESPACE_URL, f"{alert.id}/{customer_id}/{batch}"))
            )
            fired.append(
                Firing(
                    alert, customer_id, meter, after.usage.result(func), after.credited, event_id
                )
            )
    return fired


def _send(con: Con, live: Live, organization_id: str, fired: list[Firing], at_us: int) -> None:
    """Write the events of what fired, with their data made in one go (a batch may fire for
    many customers at once)."""
    if not fired:
        return
    data = live.alert_payload(con, live.balances, fired)
    webhook_tables.enqueue_many(
        con,
        live,
        organization_id,
        "meter.alert",
        [(f.event_id, d) for f, d in zip(fired, data, strict=True)],
        at_us,
    )


def basic_payload(con: Con, balances: Balances, fired: list[Firing]) -> list[dict[str, Any]]:
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
