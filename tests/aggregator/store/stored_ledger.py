"""The ledger's usage as DuckDB's tables hold it (`all_ledger_usage` and its values and points),
read by SQL: the differential check of the balances in memory while the tables still exist."""

from __future__ import annotations

import duckdb

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import first_row
from aggregator.store.tables.customer_tables import CustomerRow
from meters.aggregations import Partial


def stored_usage(con: duckdb.DuckDBPyConnection, meter: MeterRow, names: list[str]) -> Partial:
    """The usage of the subjects `names` in the meter's current windows, as the tables hold it."""
    partial = Partial()
    which = " OR ".join("subject = ?" for _ in names) or "FALSE"
    params = [meter.id, *names]
    row = first_row(
        con,
        "SELECT sum(events), sum(total), min(low), max(high) FROM all_ledger_usage"
        f" WHERE meter_id = ?::UUID AND ({which})",
        params,
    )
    if row is not None and row[0] is not None:
        partial.add(int(row[0]), float(row[1]), float(row[2]), float(row[3]))
    if partial.events and meter.aggregation.func == "latest":
        point = first_row(
            con,
            "SELECT max({'at_us': at_us, 'value': value}) FROM all_ledger_points"
            f" WHERE meter_id = ?::UUID AND ({which})",
            params,
        )
        if point is not None and point[0] is not None:
            partial.add_point(point[0]["at_us"], point[0]["value"])
    if not partial.events and str(meter.aggregation.func) == "unique":
        values = con.execute(
            "SELECT DISTINCT value FROM all_ledger_usage_values"
            f" WHERE meter_id = ?::UUID AND ({which})",
            params,
        ).fetchall()
        partial.values = {v[0] for v in values}
    return partial


def stored_consumed(
    con: duckdb.DuckDBPyConnection, customer: CustomerRow, meter: MeterRow
) -> float:
    """The customer meter's consumed units as the tables hold them."""
    usage = stored_usage(con, meter, subjects.of_customer(customer))
    return usage.result(str(meter.aggregation.func))


def stored_first_us(con: duckdb.DuckDBPyConnection, customer: CustomerRow, meter: MeterRow) -> int:
    """When the customer meter's usage in its current windows began, as the tables hold it."""
    names = subjects.of_customer(customer)
    which = " OR ".join("subject = ?" for _ in names) or "FALSE"
    row = first_row(
        con,
        "SELECT epoch_us(min(created_at)) FROM all_ledger_usage"
        f" WHERE meter_id = ?::UUID AND ({which})",
        [meter.id, *names],
    )
    assert row is not None
    return int(row[0])
