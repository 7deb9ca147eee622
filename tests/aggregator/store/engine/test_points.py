"""Points (schema step 26): a data dir of the main before them opens, keeps its meters' answers
and takes latest and integral meters; a latest meter's ledger point is the greatest however
the ledger's checkpoints are taken, and the balances rebuilt at open hold the same."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import orjson

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import MeterRow, get_meter
from aggregator.store.engine.migrations import MIGRATIONS, migrate
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import get_customer_by_external_id
from aggregator.store.tables.ledger_reads import held_customer_meter
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.quantities import Scope, compute
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import datetime_to_us
from tests.aggregator.store.stored_ledger import stored_consumed

ORG = str(uuid.uuid4())
SUM_METER = str(uuid.uuid4())
DAY = datetime_to_us(datetime(2026, 3, 2, tzinfo=UTC))
HOUR = 3_600 * 10**6
END = DAY + 24 * HOUR - 1
NOW = DAY + 30 * HOUR  # when the test writes


def _previous_main_data_dir(path: Path) -> None:
    """Schema step 25 (the main before points) with a sum meter and its rollup (tokens 7)."""
    con = duckdb.connect(str(path))
    assert migrate(con, until=25) == 25
    con.execute(
        "INSERT INTO meters (id, organization_id, name, unit, filter, aggregation, metadata,"
        " created_at, backfill_target) VALUES (?, ?, 'tokens', 'scalar', ?, ?, '{}', now(), 0)",
        [
            SUM_METER,
            ORG,
            orjson.dumps({"conjunction": "and", "clauses": []}).decode(),
            orjson.dumps({"func": "sum", "property": "tokens"}).decode(),
        ],
    )
    con.execute(
        "INSERT INTO rollups VALUES (?, 'ext:acme', make_timestamptz(?::BIGINT), 2, 7, 3, 4)",
        [SUM_METER, DAY + HOUR],
    )
    con.close()


def _event(key: str, hours: float, **metadata: Any) -> Event:
    return Event(
        name="use",
        timestamp_us=DAY + round(hours * HOUR),
        customer_id=None,
        external_customer_id="acme",
        external_id=key,
        parent_id=None,
        external_member_id=None,
        metadata=metadata,
        cost_amount=None,
    )


def _quantity(con: duckdb.DuckDBPyConnection, meter_id: str) -> float:
    meter = get_meter(con, ORG, meter_id)
    assert meter is not None
    _, total = compute(con, Scope(meter, None), DAY, END, "day", ZoneInfo("UTC"), None, END)
    return total


def test_a_data_dir_from_before_points_gains_latest_and_integral_meters(tmp_path: Path) -> None:
    path = tmp_path / "meterline.duckdb"
    _previous_main_data_dir(path)

    async def run() -> tuple[float, float, float]:
        async with Store(path) as store:
            made = []
            for name, aggregation in (
                ("gauge", {"func": "latest", "property": "gb"}),
                ("storage", {"func": "integral", "property": "gb"}),
            ):
                create = MeterCreate.model_validate(
                    {
                        "name": name,
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": aggregation,
                    }
                )
                meter = await store.write(
                    create_meter(ORG, create, NOW, meter_id=str(uuid.uuid4()))
                )
                made.append(meter.id)
            events = [_event("a", 6, gb=10), _event("b", 18, gb=30)]
            await store.write(IngestJob(ORG, to_table(events), NOW))

            def read(con: duckdb.DuckDBPyConnection) -> tuple[float, float, float]:
                return _quantity(con, SUM_METER), _quantity(con, made[0]), _quantity(con, made[1])

            return await store.read(read)

    assert asyncio.run(run()) == (7.0, 30.0, 10 * 12 + 30 * 6 - 30 / HOUR)
    con = duckdb.connect(str(path))
    assert migrate(con) == len(MIGRATIONS)  # nothing left to apply
    con.close()


def test_a_latest_ledger_point_is_the_greatest_through_checkpoints_and_reopening(
    tmp_path: Path,
) -> None:
    """Points of one customer in several batches (later instants first, a tie at one instant),
    a checkpoint of the ledger taken between some of them; the consumed units as stored and
    from memory, and again from the balances rebuilt when the store opens anew."""
    path = tmp_path / "meterline.duckdb"
    batches = [
        [_event("a", 5, gb=4)],
        [_event("b", 3, gb=9), _event("c", 5, gb=2)],  # earlier; a tie with a lower value
        [_event("d", 5, gb=6)],  # a tie with a greater value: the latest now
        [_event("e", 1, gb=50)],
    ]

    async def consumed(store: Store, meter: MeterRow) -> tuple[float, float]:
        def read(con: duckdb.DuckDBPyConnection) -> tuple[float, float]:
            customer = get_customer_by_external_id(con, ORG, "acme")
            assert customer is not None
            held = held_customer_meter(store.live.balances, customer, meter).consumed
            return stored_consumed(con, customer, meter), held

        return await store.read(read)

    async def run() -> list[tuple[float, float]]:
        seen = []
        async with Store(path, checkpoint_seconds=3600) as store:
            await store.write(
                create_customer(
                    ORG,
                    CustomerCreate(email="a@example.com", external_id="acme"),
                    0,
                    customer_id=str(uuid.uuid4()),
                )
            )
            create = MeterCreate.model_validate(
                {
                    "name": "gauge",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "latest", "property": "gb"},
                }
            )
            meter = await store.write(create_meter(ORG, create, NOW, meter_id=str(uuid.uuid4())))
            for n, batch in enumerate(batches):
                await store.write(IngestJob(ORG, to_table(batch), NOW))
                if n % 2:
                    await store.checkpoint_ledger()
                seen.append(await consumed(store, meter))
        async with Store(path) as store:
            seen.append(await consumed(store, meter))
        return seen

    assert asyncio.run(run()) == [(4.0, 4.0), (4.0, 4.0), (6.0, 6.0), (6.0, 6.0), (6.0, 6.0)]
