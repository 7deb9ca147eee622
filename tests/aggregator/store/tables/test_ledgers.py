"""A shard keeps the ledgers of the customers it holds only (`ledger_tables.Ledgers`): another
shard's customer's credit or hold is refused before anything is written, and a plan's cycles
are counted without a credit or reset; a data dir that kept another shard's customers' ledger
(as every shard did before) is refused at start, not served."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from aggregator.errors import CustomerElsewhere, UsageError
from aggregator.store import Store
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.hold_tables import create_job as create_hold
from aggregator.store.tables.ledger_tables import credit_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.plan_tables import get_plan, plan_create_job
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.ledger_rules import CreditCreate, HoldCreate, PlanCreate
from meters.times import now_us

ORG = "3c0bd7a4-8a8e-4c55-9d3f-0b1a5f1c2e77"  # fixed: test ids must agree across workers
METER = "5d4c3b2a-1f0e-4d9c-8b7a-6e5f4d3c2b1a"


def _ours(_organization_id: str, routing_key: str) -> bool:
    return routing_key == "ext:ours"


async def _made(store: Store, now: int) -> None:
    for name in ("ours", "theirs"):
        made = CustomerCreate(email=f"{name}@example.com", external_id=name)
        await store.write(create_customer(ORG, made, now, customer_id=str(uuid.uuid4())))
    meter = MeterCreate.model_validate(
        {
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
    )
    await store.write(create_meter(ORG, meter, now, meter_id=METER))


def _credit(customer: str, key: str) -> CreditCreate:
    return CreditCreate(
        external_customer_id=customer, meter_id=uuid.UUID(METER), units=100, external_id=key
    )


def _ledger_rows(store: Store) -> tuple[int, int, int]:
    """Customer meters, holds and system events stored."""
    assert store._con is not None
    counts = [
        store._con.execute(f"SELECT count(*) FROM {sql}").fetchall()[0][0]
        for sql in ("customer_meters", "meter_holds", "events WHERE source = 'system'")
    ]
    return counts[0], counts[1], counts[2]


def test_a_shard_keeps_its_own_customers_ledgers(tmp_path: Path) -> None:
    asyncio.run(_own_only(tmp_path))


async def _own_only(tmp_path: Path) -> None:
    now = now_us()
    async with Store(tmp_path / "shard.duckdb", holds_customer=_ours) as store:
        await _made(store, now)
        await store.write(credit_job(ORG, _credit("ours", "c1"), now))
        assert _ledger_rows(store) == (1, 0, 1)
        with pytest.raises(CustomerElsewhere):
            await store.write(credit_job(ORG, _credit("theirs", "c2"), now))
        hold = HoldCreate(
            external_customer_id="theirs", meter_id=uuid.UUID(METER), units=1, external_id="h"
        )
        with pytest.raises(CustomerElsewhere):
            await store.write(create_hold(ORG, hold, now, hold_id=str(uuid.uuid4())))
        plan_id = str(uuid.uuid4())
        plan = PlanCreate(
            external_customer_id="theirs",
            meter_id=uuid.UUID(METER),
            units=10,
            interval="month",
            external_id="p",
        )
        await store.write(plan_create_job(ORG, plan, now, plan_id=plan_id))
        assert _ledger_rows(store) == (1, 0, 1)  # nothing of theirs
        found = await store.read(lambda con: get_plan(con, ORG, plan_id))
        assert found is not None and found.cycles == 1  # counted as on their shard


def test_a_data_dir_keeping_another_shards_ledger_is_refused(tmp_path: Path) -> None:
    asyncio.run(_kept_elsewhere(tmp_path))


async def _kept_elsewhere(tmp_path: Path) -> None:
    now = now_us()
    kept_all, own = tmp_path / "every.duckdb", tmp_path / "own.duckdb"
    async with Store(kept_all) as store:  # as every shard was: every customer's ledger
        await _made(store, now)
        await store.write(credit_job(ORG, _credit("theirs", "c"), now))
    with pytest.raises(UsageError, match="1 customers another shard holds"):
        Store(kept_all, holds_customer=_ours).open()
    async with Store(own) as store:  # only its own customers' credits: served
        await _made(store, now)
        await store.write(credit_job(ORG, _credit("ours", "c"), now))
    async with Store(own, holds_customer=_ours) as store:
        assert _ledger_rows(store) == (1, 0, 1)
