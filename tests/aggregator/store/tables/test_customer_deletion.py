"""Deleting a customer in the store: a data dir of the previous main (schema step 13) gains
`deleted_customers`; deletion takes the ledger with it and leaves events and rollups; a new
customer with the deleted one's external id starts from nothing. And the export's pages."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import duckdb
import orjson

from aggregator.store import Store
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.engine.migrations import MIGRATIONS, migrate
from aggregator.store.tables.customer_deletion import delete_job
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import customers_after, get_customer_by_external_id
from aggregator.store.tables.ledger_reads import held_customer_meter
from aggregator.store.tables.outbox import pending
from meters.customer_rules import CustomerCreate
from tests.aggregator.store.stored_ledger import stored_consumed

ORG = str(uuid.uuid4())
METER = str(uuid.uuid4())
CUSTOMER = str(uuid.uuid4())


def _previous_main_data_dir(path: Path) -> None:
    """Step 13: a customer 'acme' with usage under both of its ids, credits, a plan, a rollup."""
    con = duckdb.connect(str(path))
    assert migrate(con, until=13) == 13
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
        "INSERT INTO customers (id, organization_id, type, email, name, external_id, metadata,"
        " created_at) VALUES (?, ?, 'individual', 'a@example.com', 'Ada', 'acme', '{}', now())",
        [CUSTOMER, ORG],
    )
    for subject, total in (("ext:acme", 7), (f"id:{CUSTOMER}", 5)):
        con.execute(
            "INSERT INTO ledger_usage VALUES (?, ?, 1, ?, ?, ?, now(), now())",
            [METER, subject, total, total, total],
        )
        con.execute(
            "INSERT INTO rollups VALUES (?, ?, make_timestamptz(0), 1, ?, ?, ?)",
            [METER, subject, total, total, total],
        )
    con.execute(
        "INSERT INTO events (seq, organization_id, name, timestamp, ingested_at, customer_id,"
        " metadata) VALUES (1, ?, 'use', now(), now(), ?, '{}')",
        [ORG, CUSTOMER],
    )
    con.execute(
        "INSERT INTO customer_meters (id, organization_id, customer_id, meter_id, credited,"
        " created_at, modified_at) VALUES (?, ?, ?, ?, 100, now(), now())",
        [str(uuid.uuid4()), ORG, CUSTOMER, METER],
    )
    con.execute(
        "INSERT INTO credit_plans (id, organization_id, external_id, customer_id, meter_id,"
        " units, interval, rollover, starts_at, next_cycle_at, created_at)"
        " VALUES (?, ?, 'p', ?, ?, 10, 'month', false, now(), now(), now())",
        [str(uuid.uuid4()), ORG, CUSTOMER, METER],
    )
    con.close()


def test_a_previous_data_dir_deletes_a_customer_and_its_ledger_only(tmp_path: Path) -> None:
    path = tmp_path / "meterline.duckdb"
    _previous_main_data_dir(path)

    async def balance(store: Store) -> tuple[float, int, float] | None:
        def read(con: duckdb.DuckDBPyConnection) -> tuple[float, int, float] | None:
            customer = get_customer_by_external_id(con, ORG, "acme")
            meter = get_meter(con, ORG, METER)
            if customer is None or meter is None:
                return None
            cm = held_customer_meter(store.live.balances, customer, meter)
            return cm.consumed, cm.credited, stored_consumed(con, customer, meter)

        return await store.read(read)

    async def run() -> list[tuple[float, int, float] | None]:
        seen = []
        async with Store(path) as store:
            seen.append(await balance(store))
            await store.write(delete_job(ORG, CUSTOMER, True, 10**15))
            seen.append(await balance(store))
            created = CustomerCreate(email="a@example.com", external_id="acme")
            await store.write(create_customer(ORG, created, 10**15, customer_id=str(uuid.uuid4())))
            seen.append(await balance(store))
        async with Store(path) as store:  # what was held in memory agrees with the tables
            seen.append(await balance(store))
        return seen

    assert asyncio.run(run()) == [(12.0, 100, 12.0), None, (0.0, 0, 0.0), (0.0, 0, 0.0)]
    con = duckdb.connect(str(path))
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchall() == [
        (len(MIGRATIONS),)
    ]
    deleted = con.execute(
        "SELECT id::VARCHAR, email, name, external_id, anonymized FROM deleted_customers"
    ).fetchall()
    assert deleted == [(CUSTOMER, None, None, "acme", True)]
    assert con.execute("SELECT count(*) FROM ledger_usage").fetchall() == [(0,)]
    # Not yet forwarded: it still goes upstream under the external id its customer had.
    (waiting,) = pending(con, ORG, 0, 10)
    assert waiting.event["external_customer_id"] == "acme"
    assert con.execute("SELECT sum(total) FROM all_rollups").fetchall() == [(12.0,)]
    # The rows the data dir kept in its base tables were moved into files when it opened.
    assert con.execute("SELECT count(*) FROM rollups").fetchall() == [(0,)]
    assert con.execute("SELECT count(*) FROM events_base").fetchall() == [(0,)]
    assert con.execute("SELECT count(*) FROM credit_plans WHERE deleted_at IS NULL").fetchall() == [
        (0,)
    ]
    con.close()


def test_export_pages_read_every_customer_once(tmp_path: Path) -> None:
    async def run() -> list[str]:
        async with Store(tmp_path / "m.duckdb") as store:
            for i in range(7):
                data = CustomerCreate(email=f"c{i}@example.com", external_id=f"c{i}")
                # Equal creation times: the id breaks the tie, and no page repeats or skips.
                await store.write(
                    create_customer(ORG, data, 10**15 + i // 3, customer_id=str(uuid.uuid4()))
                )
            seen: list[str] = []
            after = None
            while True:
                rows = await store.read(customers_after, ORG, after, 2)
                seen += [r.external_id or "" for r in rows]
                if len(rows) < 2:
                    return seen
                after = (rows[-1].created_at_us, rows[-1].id)

    seen = asyncio.run(run())
    assert sorted(seen) == [f"c{i}" for i in range(7)]
    assert len(seen) == 7
