"""The lakehouse export's second table (`aggregator.export.usage`): each customer meter's usage
per day (UTC), as the meter's quantities answer it, and which (organization, day) partitions
may have changed since a moment.

A partition changes when an event of that day is stored or voided, and every partition of an
organization when one of its meters is made, changed or archived. While a meter backfills, its
rollups are partial: the usage waits until no backfill is pending."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import meters_of
from aggregator.store.base.rows import first_row
from aggregator.store.metering.rollups import kind
from aggregator.store.tables.quantities import Scope, gather, reduce
from meters.aggregations import Partial

__all__ = ["SCHEMA", "changed", "organizations_between", "usage"]

Con = duckdb.DuckDBPyConnection
DAY_US = 86_400_000_000
_UTC = ZoneInfo("UTC")

_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("organization_id", pa.string()),
    ("day", pa.date32()),
    ("meter_id", pa.string()),
    ("meter_name", pa.string()),
    ("customer_id", pa.string()),
    ("external_customer_id", pa.string()),
    ("quantity", pa.float64()),
    ("events", pa.int64()),
]
SCHEMA = pa.schema(_COLUMNS)


def changed(con: Con, since_us: int, margin_us: int) -> list[tuple[str, date]] | None:
    """The (organization, day) partitions whose usage may have changed since `since_us`; None
    while a meter's backfill is pending (its rollups are partial: ask again later). Events
    and voids are looked at `margin_us` further back (one applied before `since_us` may have
    been stored after it); meters are written at once, and looked at from `since_us`."""
    pending = first_row(
        con,
        "SELECT count(*) FROM meters WHERE archived_at IS NULL AND backfilled_to < backfill_target",
    )
    if pending and pending[0]:
        return None
    rows = con.execute(
        "SELECT DISTINCT organization_id::VARCHAR, timestamp::DATE FROM all_events"
        " WHERE ingested_at >= make_timestamptz(?)"
        " UNION SELECT DISTINCT e.organization_id::VARCHAR, e.timestamp::DATE"
        " FROM voided_events v JOIN all_events e USING (seq)"
        " WHERE v.voided_at >= make_timestamptz(?)"
        " UNION SELECT DISTINCT organization_id::VARCHAR, timestamp::DATE FROM events"
        " WHERE organization_id IN (SELECT organization_id FROM meters"
        " WHERE created_at >= make_timestamptz(?) OR modified_at >= make_timestamptz(?)"
        " OR archived_at >= make_timestamptz(?))"
        " ORDER BY ALL",
        [since_us - margin_us] * 2 + [since_us] * 3,
    ).fetchall()
    return [(str(o), d) for o, d in rows]


def organizations_between(con: Con, first: date, last: date) -> list[str]:
    """The organizations with events (current or voided) dated from day `first` to `last`."""
    rows = con.execute(
        "SELECT DISTINCT organization_id::VARCHAR FROM all_events"
        " WHERE timestamp >= make_timestamptz(?) AND timestamp < make_timestamptz(?) ORDER BY 1",
        [_us(first), _us(last) + DAY_US],
    ).fetchall()
    return [str(r[0]) for r in rows]


def usage(con: Con, organization_id: str, days: list[date], now_us: int) -> pa.Table:
    """Each customer meter's usage on each of `days` (UTC) of the organization's meters (but
    archived and failed ones): its quantity and the events counted, per customer (by id when
    the customer is known, else by the external id its events named)."""
    if not days:
        return SCHEMA.empty_table()
    start_us = _us(min(days))
    end_us = _us(max(days)) + DAY_US - 1
    wanted = {(d - min(days)).days for d in days}
    found: list[dict[str, Any]] = []
    for meter in meters_of(con, [organization_id]):
        scope = Scope(meter, None, by_customer=True)
        gathered = gather(con, scope, start_us, end_us, "day", _UTC, now_us)
        for (index, customer), partial in gathered.partials.items():
            if index not in wanted or not customer:
                continue
            found.append(
                {
                    "organization_id": organization_id,
                    "day": min(days) + timedelta(days=index),
                    "meter_id": meter.id,
                    "meter_name": meter.name,
                    "customer": customer,
                    "quantity": reduce({(index, customer): partial}, meter, index, None),
                    "events": _events(partial, kind(meter)),
                }
            )
    return _with_customers(con, organization_id, found)


def _events(partial: Partial, found: str) -> int:
    return len(partial.values) if found == "unique" else int(partial.events)


def _with_customers(con: Con, organization_id: str, found: list[dict[str, Any]]) -> pa.Table:
    """`found`'s customer references as the customer's id and external id."""
    known = {
        subjects.of_id(str(i)): (str(i), e)
        for i, e in con.execute(
            "SELECT id, external_id FROM customers WHERE organization_id = ?::UUID",
            [organization_id],
        ).fetchall()
    }
    for row in found:
        customer = row.pop("customer")
        if customer in known:
            row["customer_id"], row["external_customer_id"] = known[customer]
        elif customer.startswith(subjects.ID):  # a customer deleted since
            row["customer_id"] = customer.removeprefix(subjects.ID)
            row["external_customer_id"] = None
        else:
            row["customer_id"] = None
            row["external_customer_id"] = customer.removeprefix(subjects.EXTERNAL)
    return pa.Table.from_pylist(found, schema=SCHEMA)


def _us(day: date) -> int:
    return (day - date(1970, 1, 1)).days * DAY_US
