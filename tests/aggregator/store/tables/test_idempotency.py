"""Idempotency keys of credits, resets and plans live in their own space: no event external_id
takes one, a key reused for another request is refused, and keys used by a data directory of
the previous schema keep working."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pytest

from aggregator.errors import KeyReused
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_tables import credit_job, reset_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.plan_tables import plan_create_job
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import CreditCreate, PlanCreate, ResetCreate
from meters.times import now_us
from tests.aggregator.store.schema_before import before_segments

ORG = str(uuid.uuid4())


async def _setup(store: Store) -> tuple[str, str]:
    customer = await store.write(
        create_customer(
            ORG,
            CustomerCreate(email="a@example.com", external_id="acme"),
            now_us(),
            customer_id=str(uuid.uuid4()),
        )
    )
    definition = MeterCreate.model_validate(
        {
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
    )
    meter = await store.write(create_meter(ORG, definition, now_us(), meter_id=str(uuid.uuid4())))
    return customer.id, meter.id


def _credit(meter_id: str, key: str, units: int = 10) -> CreditCreate:
    return CreditCreate(
        external_customer_id="acme", meter_id=uuid.UUID(meter_id), units=units, external_id=key
    )


async def _ingest(store: Store, external_id: str) -> int:
    event = Event(
        name="use",
        timestamp_us=now_us(),
        customer_id=None,
        external_customer_id="acme",
        external_id=external_id,
        parent_id=None,
        external_member_id=None,
        metadata={"tokens": 1},
        cost_amount=None,
    )
    result = await store.write(IngestJob(ORG, to_table([event]), now_us()))
    return int(result.inserted)


def test_an_event_cannot_take_a_credits_key(tmp_path: Path) -> None:
    asyncio.run(_event_first(tmp_path))


async def _event_first(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb") as store:
        _, meter_id = await _setup(store)
        for key in ("meterline:credit:invoice-2026-12", "meterline:reset:r1"):
            assert await _ingest(store, key) == 1
        applied = await store.write(credit_job(ORG, _credit(meter_id, "invoice-2026-12"), 1))
        assert not applied.replayed and applied.customer_meter.credited == 10
        reset = ResetCreate(
            external_customer_id="acme", meter_id=uuid.UUID(meter_id), external_id="r1"
        )
        assert not (await store.write(reset_job(ORG, reset, now_us()))).replayed
        # And no key takes an event's external_id: the ids credits once used are free too.
        assert await _ingest(store, "meterline:credit:other") == 1


def test_a_key_answers_its_first_request_and_refuses_others(tmp_path: Path) -> None:
    asyncio.run(_reuse(tmp_path))


async def _reuse(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb") as store:
        customer_id, meter_id = await _setup(store)
        first = await store.write(credit_job(ORG, _credit(meter_id, "k"), now_us()))
        await _ingest(store, "e1")
        again = await store.write(credit_job(ORG, _credit(meter_id, "k"), now_us()))
        assert again.replayed and again.customer_meter == first.customer_meter
        with pytest.raises(KeyReused, match="'k'"):
            await store.write(credit_job(ORG, _credit(meter_id, "k", 11), now_us()))
        # The same key is a different key for another operation.
        reset = ResetCreate(
            customer_id=uuid.UUID(customer_id), meter_id=uuid.UUID(meter_id), external_id="k"
        )
        assert not (await store.write(reset_job(ORG, reset, now_us()))).replayed
        plan: dict[str, Any] = {
            "external_customer_id": "acme",
            "meter_id": meter_id,
            "units": 5,
            "interval": "month",
            "external_id": "k",
        }
        created, new = await store.write(
            plan_create_job(
                ORG, PlanCreate.model_validate(plan), now_us(), plan_id=str(uuid.uuid4())
            )
        )
        assert new
        found, new = await store.write(
            plan_create_job(
                ORG, PlanCreate.model_validate(plan), now_us(), plan_id=str(uuid.uuid4())
            )
        )
        assert not new and found.id == created.id
        with pytest.raises(KeyReused):
            await store.write(
                plan_create_job(
                    ORG,
                    PlanCreate.model_validate({**plan, "units": 6}),
                    now_us(),
                    plan_id=str(uuid.uuid4()),
                )
            )


def test_keys_of_a_previous_data_dir_still_replay(tmp_path: Path) -> None:
    asyncio.run(_previous(tmp_path))


def _as_previous_main_left_it(path: Path) -> None:
    """Schema step 7: no key table; credits and resets keyed by their system events'
    external_ids (`meterline:credit:<key>`, `meterline:reset:<key>`, plan cycles'
    `meterline:plan:<id>:<n>:…`), as the previous main wrote them."""
    con = duckdb.connect(str(path))
    before_segments(con)  # first: the steps below are undone on its tables
    con.execute("DROP TABLE idempotency_keys")
    con.execute("DROP TABLE kafka_offset_resets")  # step 9, a later one
    # Step 10's deltas are empty (a clean close takes the ledger's checkpoint), as if folded
    # into the keyed tables that main used.
    for keyed, deltas in (
        ("rollups", "rollup_deltas"),
        ("rollup_values", "rollup_value_deltas"),
        ("ledger_usage", "ledger_usage_deltas"),
        ("ledger_usage_values", "ledger_usage_value_deltas"),
    ):
        con.execute(f"DROP VIEW all_{keyed}")
        con.execute(f"DROP TABLE {deltas}")
    con.execute("DROP INDEX customers_external_id")  # step 11
    con.execute("DROP TABLE ingest_stored")  # step 12
    con.execute("DROP TABLE deleted_customers")  # step 14
    con.execute("DROP TABLE event_types")  # step 15
    con.execute("DROP TABLE meter_holds")  # step 16
    for table in ("endpoints", "events", "outbox", "deliveries", "state_changes", "state_sent"):
        con.execute(f"DROP TABLE webhook_{table}")  # step 17
    con.execute("DROP TABLE meter_alerts")  # step 18
    for column in ("backfill_events", "backfilled_events"):
        con.execute(f"ALTER TABLE meters DROP COLUMN {column}")  # step 19
    con.execute("DROP TABLE command_outcomes")  # step 21
    con.execute("DROP TABLE control_offsets")
    con.execute("ALTER TABLE customers DROP COLUMN routing_key")  # step 23
    con.execute("DELETE FROM schema_migrations WHERE version >= 8")
    for name, key in (
        ("meter.credited", "meterline:credit:old"),
        ("meter.reset", "meterline:reset:old"),
    ):
        con.execute(
            "UPDATE events SET external_id = ? WHERE seq = (SELECT min(seq) FROM events"
            " WHERE source = 'system' AND name = ? AND external_id IS NULL)",
            [key, name],
        )
    con.close()


async def _previous(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    async with Store(path) as store:
        customer_id, meter_id = await _setup(store)
        await store.write(credit_job(ORG, _credit(meter_id, "first"), now_us()))
        reset = ResetCreate(
            customer_id=uuid.UUID(customer_id), meter_id=uuid.UUID(meter_id), external_id="r"
        )
        await store.write(reset_job(ORG, reset, now_us()))
        plan = PlanCreate(
            external_customer_id="acme",
            meter_id=uuid.UUID(meter_id),
            units=5,
            interval="month",
            external_id="plan",
        )
        await store.write(plan_create_job(ORG, plan, now_us() - 1, plan_id=str(uuid.uuid4())))
    _as_previous_main_left_it(path)
    async with Store(path) as store:
        old = await store.write(credit_job(ORG, _credit(meter_id, "old", 99), now_us()))
        assert old.replayed and old.customer_meter.credited == 5  # as it is now: plan's cycle
        reset = ResetCreate(
            customer_id=uuid.UUID(customer_id), meter_id=uuid.UUID(meter_id), external_id="old"
        )
        assert (await store.write(reset_job(ORG, reset, now_us()))).replayed
        other = plan.model_copy(update={"units": 6})  # kept without its request: a replay
        _, new = await store.write(plan_create_job(ORG, other, now_us(), plan_id=str(uuid.uuid4())))
        assert not new
        # The system events' ids are free for events now.
        assert await _ingest(store, "meterline:credit:old") == 1
        fresh = await store.write(credit_job(ORG, _credit(meter_id, "new", 7), now_us()))
        assert not fresh.replayed and fresh.customer_meter.credited == 12
