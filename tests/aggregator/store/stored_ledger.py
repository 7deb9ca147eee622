"""The ledger as a start reads it back (`ledger_log.load`: its checkpoint, the changes since and
the usage added since), into balances of its own: the differential check of the balances in
memory against what is stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from aggregator.store import Store
from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.engine import ledger_log
from aggregator.store.engine.balances import Balances, Usage
from aggregator.store.engine.ingest_log_repair import log_directory
from aggregator.store.engine.segments import Segments, folder_of
from aggregator.store.tables.customer_tables import CustomerRow
from meters.aggregations import Partial


def reloaded(con: duckdb.DuckDBPyConnection) -> Balances:
    """The balances a start on `con`'s database reads back."""
    [(path,)] = con.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchall()
    balances = Balances()
    ledger_log.load(con, balances, Segments(folder_of(Path(path))))
    return balances


def _stored(con: duckdb.DuckDBPyConnection, meter: MeterRow, names: list[str]) -> Usage:
    return reloaded(con).usage(meter.id, names, named=True)


def stored_usage(con: duckdb.DuckDBPyConnection, meter: MeterRow, names: list[str]) -> Partial:
    """The usage of the subjects `names` in the meter's current windows, as stored."""
    return _stored(con, meter, names).partial


def stored_consumed(
    con: duckdb.DuckDBPyConnection, customer: CustomerRow, meter: MeterRow
) -> float:
    """The customer meter's consumed units as stored."""
    usage = stored_usage(con, meter, subjects.of_customer(customer))
    return usage.result(str(meter.aggregation.func))


def stored_first_us(con: duckdb.DuckDBPyConnection, customer: CustomerRow, meter: MeterRow) -> int:
    """When the customer meter's usage in its current windows began, as stored."""
    first = _stored(con, meter, subjects.of_customer(customer)).first_us
    assert first is not None
    return first


def stored_numbers(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, int, float]]:
    """Every (meter id, subject, events, total) with usage, as stored."""
    numbers = reloaded(con).export()[0].select(["meter_id", "subject", "events", "total"])
    return sorted(zip(*numbers.to_pydict().values(), strict=True))


async def crash_image(store: Store, target: Path) -> None:
    """At `target`, what a kill -9 of `store` would leave once everything applied is stored,
    without the ledger's checkpoint a clean stop takes: its snapshot, and its ingest log."""
    await store.snapshot(target)
    source = log_directory(Path(store.path))
    if source.is_dir():
        shutil.copytree(source, log_directory(target))
