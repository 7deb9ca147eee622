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
from functools import partial
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from aggregator.errors import NotFound
from aggregator.store import idempotency, subjects, webhook_tables
from aggregator.store.catalog import CustomerKey
from aggregator.store.customer_tables import CustomerRow, get_customer, get_customer_by_external_id
from aggregator.store.meter_tables import MeterRow, get_meter
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
Payload = Callable[[Con, "Balances", AlertRow, str, MeterRow, float, int], dict[str, Any]]

_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, meter_id::VARCHAR, customer_id::VARCHAR, metric,"
    " operator, threshold, external_id, epoch_us(created_at)"
)


def _row(r: tuple[Any, ...]) -> AlertRow:
    return AlertRow(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]), r[7], int(r[8]))


# ---- the API's --------------------------------------------------------------------------------


def create_job(organization_id: str, data: AlertCreate, now_us: int) -> Job[tuple[AlertRow, bool]]:
    """The alert, and whether this call made it (False: its external_id made it before)."""
    request = idempotency.digest(data)

    def job(tx: Tx) -> tuple[AlertRow, bool]:
        con = tx.con
        used = idempotency.recall(con, organization_id, "alert", data.external_id, request)
        if used is not None:
            found = _by_external_id(con, organization_id, data.external_id)
            assert found is not None
            return found, False
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
        return None
    customer: CustomerRow | None
    if data.customer_id is not None:
        customer = get_customer(con, organization_id, str(data.customer_id))
        field, value = "customer_id", str(data.customer_id)
    else:
        assert data.external_customer_id is not None
        customer = get_customer_by_external_id(con, organization_id, data.external_customer_id)
        field, value = "external_customer_id", data.external_customer_id
    if customer is None:
        raise ValidationFailed(
            [FieldError("customer_not_found", ("body", field), "Customer not found.", value)],
            business=True,
        )
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


def _alerts_of(con: Con, live: Live, organization_id: str) -> list[AlertRow]:
    held = live.alerts.get(organization_id)
    if held is None:
        rows = con.execute(
            f"SELECT {_COLUMNS} FROM meter_alerts WHERE organization_id = ?::UUID"  # noqa: S608
            " AND deleted_at IS NULL",
            [organization_id],
        ).fetchall()
        held = live.alerts[organization_id] = [_row(r) for r in rows]
    return held


# ---- evaluation ------------------------------------------------------------------------------


def on_usage(con: Con, live: Live, evaluated: Evaluated, batch: int) -> None:
    """Evaluate the organization's alerts on the customer meters a batch's usage changed.
    `batch` (its first seq) names each event fired: the ingest log's replay of the batch at
    start then writes none twice."""
    org = evaluated.organization_id
    alerts = _alerts_of(con, live, org)
    if not alerts:
        return
    watched = {a.meter_id for a in alerts}
    meters = {m.id: m for m in evaluated.meters if m.id in watched}
    if not meters:
        return
    deltas: dict[tuple[str, str], Partial] = {}
    customers: dict[str, CustomerKey] = {}
    for table in (evaluated.ledger, evaluated.ledger_values):
        unique = table is evaluated.ledger_values
        rows = _rows_of(table, set(meters))
        if unique and rows:
            keys = iter(_value_keys(live, rows))
        for row in rows:
            customer = live.catalog.customer_of_subject(con, org, row["subject"])
            if customer is None:  # an external id no customer has: no customer meter
                continue
            customers[customer.id] = customer
            delta = deltas.setdefault((row["meter_id"], customer.id), Partial())
            if unique:
                delta.values.add(next(keys))
            else:
                delta.add(row["events"], row["total"], row["low"], row["high"])
    for (meter_id, customer_id), delta in deltas.items():
        meter = meters[meter_id]
        before = value(live, customers[customer_id], meter)
        after = Value(_merged(before.usage, delta), before.credited)
        _changed(con, live, alerts, customer_id, meter, before, after, evaluated.at_us, batch)


def _value_keys(live: Live, rows: list[dict[str, Any]]) -> list[Hashable]:
    """Each row's value keyed as the balances key it (per meter)."""
    keys: list[Hashable] = []
    for row in rows:
        keys += live.balances.value_keys(str(row["meter_id"]), [row["value"]])
    return keys


def _rows_of(table: pa.Table, meter_ids: set[str]) -> list[dict[str, Any]]:
    if table.num_rows == 0:
        return []
    return [r for r in table.to_pylist() if str(r["meter_id"]) in meter_ids]


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
    alerts = _alerts_of(con, live, customer.organization_id)
    _changed(con, live, alerts, customer.id, meter, before, after, at_us)


def _changed(
    con: Con,
    live: Live,
    alerts: list[AlertRow],
    customer_id: str,
    meter: MeterRow,
    before: Value | None,
    after: Value,
    at_us: int,
    batch: int | None = None,
) -> None:
    live.alert_values[(meter.id, customer_id)] = after
    func = meter.aggregation.func
    for alert in alerts:
        if alert.meter_id != meter.id or alert.customer_id not in (None, customer_id):
            continue
        old = None if before is None else before.of(alert.metric, func)
        if alert_fires(alert.operator, alert.threshold, old, after.of(alert.metric, func)):
            consumed = after.usage.result(func)
            event_id = (
                None
                if batch is None
                else str(uuid.uuid5(uuid.NAMESPACE_URL, f"{alert.id}/{customer_id}/{batch}"))
            )
            webhook_tables.enqueue(
                con,
                live,
                alert.organization_id,
                "meter.alert",
                partial(
                    live.alert_payload,
                    con,
                    live.balances,
                    alert,
                    customer_id,
                    meter,
                    consumed,
                    after.credited,
                ),
                at_us,
                event_id,
            )


def basic_payload(
    con: Con,
    balances: Balances,
    alert: AlertRow,
    customer_id: str,
    meter: MeterRow,
    consumed: float,
    credited: int,
) -> dict[str, Any]:
    """A `meter.alert`'s data without the API's shapes (the store alone, as in its tests)."""
    return {
        "alert": {"id": alert.id, "external_id": alert.external_id},
        "customer_meter": {
            "customer_id": customer_id,
            "meter_id": meter.id,
            "consumed_units": consumed,
            "credited_units": credited,
            "balance": credited - consumed,
        },
    }
