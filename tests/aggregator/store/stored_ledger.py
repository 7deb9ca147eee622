"""The ledger's usage as DuckDB's tables hold it (`all_ledger_usage` and its values and points),
read by SQL: the differential check of the balances in memory while the tables still exist."""

from __future__ import annotations

import duckdb

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import among
from aggregator.store.tables.customer_tables import CustomerRow
from meters.aggregations import Partial


def _rows(
    con: duckdb.DuckDBPyConnection, select: str, table: str, meter: MeterRow, names: list[str]
) -> list[tuple[object, ...]]:
    """`select` over the rows of `table` of the meter and the subjects `names`."""
    which, params = among("subject", names)
    return con.execute(
        f"SELECT {select} FROM {table} WHERE meter_id = ?::UUID AND {which}",
        [meter.id, *params],
    ).fetchall()


def stored_usage(con: duckdb.DuckDBPyConnection, meter: MeterRow, names: list[str]) -> Partial:
    """The usage of the subjects `names` in the meter's current windows, as the tables hold it."""
    partial = Partial()
    numbers = "sum(events), sum(total), min(low), max(high)"
    [row] = _rows(con, numbers, "all_ledger_usage", meter, names)
    if row[0] is not None:
        partial.add(int(row[0]), float(row[1]), float(row[2]), float(row[3]))
    if partial.events and meter.aggregation.func == "latest":
        point = "max({'at_us': at_us, 'value': value})"
        [(best,)] = _rows(con, point, "all_ledger_points", meter, names)
        if best is not None:
            partial.add_point(best["at_us"], best["value"])
    if not partial.events and str(meter.aggregation.func) == "unique":
        values = _rows(con, "DISTINCT value", "all_ledger_usage_values", meter, names)
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
    [(first,)] = _rows(con, "epoch_us(min(created_at))", "all_ledger_usage", meter, names)
    return int(first)
