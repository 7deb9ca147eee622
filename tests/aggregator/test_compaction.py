"""Appended rollup and ledger deltas: a data dir written before them opens and reads the same,
and compaction changes no answer. (The property tests in test_quantities and
test_ledger_state_machine compact at random points.)"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import orjson

from aggregator.store import Store
from aggregator.store.compaction import compact
from aggregator.store.customers import create_job as create_customer
from aggregator.store.customers import get_customer_by_external_id
from aggregator.store.events import IngestJob
from aggregator.store.ledger import customer_meter
from aggregator.store.meters import get_meter
from aggregator.store.quantities import Scope, compute
from aggregator.store.schema import MIGRATIONS, migrate
from meters.customers import CustomerCreate
from meters.events import Event, to_table
from meters.times import datetime_to_us

ORG = str(uuid.uuid4())
METER = str(uuid.uuid4())
DAY = datetime_to_us(datetime(2026, 3, 2, tzinfo=UTC))
BUCKET = datetime_to_us(datetime(2026, 3, 2, 10, 15, tzinfo=UTC))


def _previous_main_data_dir(path: Path) -> None:
    """Schema step 9 (the main before deltas), with a sum meter's usage as it stored it: keyed
    rollup and ledger rows (two events, tokens 3 and 4, of customer 'acme')."""
    con = duckdb.connect(str(path))
    assert migrate(con, until=9) == 9
    con.execute(
        "INSERT INTO meters (id, organization_id, name, unit, filter, aggregation, metadata,"
        " created_at, backfill_target) VALUES (?, ?, 'tokens', 'scalar', ?, ?, '{}', now(), 0)",
        [
            METER,
            ORG,
            orjson.dumps({"conjunction": "and", "clauses": []}).decode(),
            orjson.dumps({"func": "sum", "property": "tokens"}).decode(),
        ],
    )
    con.execute(
        "INSERT INTO rollups VALUES (?, 'ext:acme', make_timestamptz(?::BIGINT), 2, 7, 3, 4)",
        [METER, BUCKET],
    )
    con.execute(
        "INSERT INTO ledger_usage VALUES (?, 'ext:acme', 2, 7, 3, 4, now(), now())", [METER]
    )
    con.close()


def test_a_data_dir_from_before_deltas_reads_the_same_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "meterline.duckdb"
    _previous_main_data_dir(path)

    async def readings(store: Store) -> tuple[float, float, float]:
        def read(con: duckdb.DuckDBPyConnection) -> tuple[float, float, float]:
            meter = get_meter(con, ORG, METER)
            customer = get_customer_by_external_id(con, ORG, "acme")
            assert meter is not None and customer is not None
            scope = Scope(meter, ("ext:acme",))
            end = DAY + 86_400 * 10**6 - 1
            periods, total = compute(con, scope, DAY, end, "day", ZoneInfo("UTC"), None)
            return periods[0][1], total, customer_meter(con, customer, meter).consumed

        return await store.read(read)

    async def run() -> list[tuple[float, float, float]]:
        seen = []
        async with Store(path, compact_seconds=3600) as store:
            await store.write(
                create_customer(ORG, CustomerCreate(email="a@example.com", external_id="acme"), 0)
            )
            seen.append(await readings(store))
            event = Event(
                name="use",
                timestamp_us=BUCKET + 60 * 10**6,
                customer_id=None,
                external_customer_id="acme",
                external_id="later",
                parent_id=None,
                external_member_id=None,
                metadata={"tokens": 5},
                cost_amount=None,
            )
            await store.write(IngestJob(ORG, to_table([event]), BUCKET, store.live))
            seen.append(await readings(store))
            assert await store.write(compact) == 2  # one rollup delta, one ledger delta
            seen.append(await readings(store))
            assert await store.write(compact) == 0
        async with Store(path) as store:  # reopened: the migration is not run twice
            seen.append(await readings(store))
        return seen

    assert asyncio.run(run()) == [(7, 7, 7), (12, 12, 12), (12, 12, 12), (12, 12, 12)]
    con = duckdb.connect(str(path))
    keyed = con.execute("SELECT events, total, low, high FROM rollups").fetchall()
    assert keyed == [(3, 12.0, 3.0, 5.0)]
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchall() == [
        (len(MIGRATIONS),)
    ]
    con.close()


def test_compaction_folds_each_key_once(tmp_path: Path) -> None:
    """Many batches' deltas for one key become one keyed row holding their merge."""

    async def run() -> list[tuple[int, float, float, float]]:
        async with Store(tmp_path / "m.duckdb", compact_seconds=3600) as store:
            await store.write(
                lambda con: con.execute(
                    "INSERT INTO rollup_deltas VALUES"
                    " (?, 's', make_timestamptz(0), 1, 2, 2, 2),"
                    " (?, 's', make_timestamptz(0), 2, 5, -1, 4),"
                    " (?, 's', make_timestamptz(0), 1, 1, 1, 1)",
                    [METER] * 3,
                )
            )
            await store.write(compact)
            await store.write(
                lambda con: con.execute(
                    "INSERT INTO rollup_deltas VALUES (?, 's', make_timestamptz(0), 1, 9, 9, 9)",
                    [METER],
                )
            )
            await store.write(compact)
            rows = await store.read(
                lambda con: con.execute("SELECT events, total, low, high FROM rollups").fetchall()
            )
            return [tuple(r) for r in rows]

    assert asyncio.run(run()) == [(5, 17.0, -1.0, 9.0)]


def test_the_flusher_compacts_in_the_background(tmp_path: Path) -> None:
    async def run() -> int:
        async with Store(tmp_path / "m.duckdb", compact_seconds=0) as store:
            await store.write(
                lambda con: con.execute(
                    "INSERT INTO rollup_deltas VALUES (?, 's', make_timestamptz(0), 1, 1, 1, 1)",
                    [METER],
                )
            )
            left = 1
            for _ in range(100):  # the flusher compacts between its flushes, within ~50 ms
                await asyncio.sleep(0.05)
                rows = await store.read(
                    lambda con: con.execute("SELECT count(*) FROM rollup_deltas").fetchall()
                )
                left = int(rows[0][0])
                if not left:
                    break
            return left

    assert asyncio.run(run()) == 0
