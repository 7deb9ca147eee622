"""Credit grants in a store: an expiry is a timed write (the plan cycles' job) that takes the
grant's unused units off credited once, shows in the history, fires alerts and marks the
customer's state changed; a restart, a second run or a credit in between give the same state.
And a data dir written before grants (schema step 26) keeps its credits as grants."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables import alert_tables, grant_tables, webhook_endpoints
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_tables import credit_job, reset_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.plan_tables import cycle_due_job
from aggregator.store.tables.quotas import TenantLimits
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.errors import ValidationFailed
from meters.events import EventRules, parse_ingest_body, to_table
from meters.ledger_rules import MAX_ACTIVE_GRANTS, AlertCreate, CreditCreate, ResetCreate
from meters.times import EPOCH
from meters.webhook_rules import EndpointCreate, new_secret
from tests.aggregator.store.schema_before import before_segments

ORG = "6f0e2c1b-8a7d-4e3c-9b5a-1d2e3f4a5b6c"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


class Ledger:
    """One customer and one count meter in a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ref: dict[str, Any] = {}

    async def setup(self) -> None:
        now = _us(T0)
        meter = await self.store.write(
            create_meter(
                ORG,
                MeterCreate.model_validate(
                    {
                        "name": "calls",
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": {"func": "count"},
                    }
                ),
                now,
                meter_id=str(uuid.uuid4()),
            )
        )
        customer = await self.store.write(
            create_customer(
                ORG, CustomerCreate(email="g@example.com"), now, customer_id=str(uuid.uuid4())
            )
        )
        self.ref = {"customer_id": customer.id, "meter_id": meter.id}

    async def credit(self, at: datetime, key: str, **fields: Any) -> Any:
        data = CreditCreate.model_validate({**self.ref, "external_id": key, **fields})
        return (await self.store.write(credit_job(ORG, data, _us(at)))).customer_meter

    async def use(self, at: datetime, n: int) -> None:
        body = {"events": [{"name": "call", "customer_id": self.ref["customer_id"]}] * n}
        events = parse_ingest_body(body, now=_us(at), rules=EventRules())
        await self.store.write(IngestJob(ORG, to_table(events), _us(at)))

    async def read(self, sql: str) -> list[tuple[Any, ...]]:
        return await self.store.read(lambda con: con.execute(sql).fetchall())

    async def credited(self) -> int:
        rows = await self.read("SELECT credited FROM customer_meters")
        held = self.store.live.balances.credits(self.ref["customer_id"], self.ref["meter_id"])
        assert held is not None and held.credited == rows[0][0]  # memory is DuckDB's
        return int(rows[0][0])


def test_an_expiry_takes_the_unused_units_once(tmp_path: Path) -> None:
    asyncio.run(_expiry(tmp_path / "g.duckdb"))


async def _expiry(path: Path) -> None:
    async with Store(path) as store:
        ledger = Ledger(store)
        await ledger.setup()
        await store.write(
            webhook_endpoints.create_endpoint_job(
                ORG,
                EndpointCreate(
                    url="https://example.com/h",
                    format="raw",
                    events=["meter.alert", "customer.state_changed"],
                ),
                _us(T0),
                endpoint_id=str(uuid.uuid4()),
                secret=new_secret(),
            )
        )
        await store.write(
            alert_tables.create_job(
                ORG,
                AlertCreate(
                    meter_id=ledger.ref["meter_id"],
                    metric="balance",
                    operator="lte",
                    threshold=25,
                    external_id="low",
                ),
                _us(T0),
                TenantLimits(),
                alert_id=str(uuid.uuid4()),
            )
        )
        expiry = T0 + timedelta(days=30)
        await ledger.credit(T0, "promo", units=10, priority=1, expires_at=expiry)
        await ledger.credit(T0, "paid", units=20)
        await ledger.use(T0 + timedelta(days=1), 3)  # burns the promo first: 7 of it left
        assert await ledger.credited() == 30
        # Not due yet: nothing happens.
        assert await store.write(cycle_due_job(_us(expiry) - 1, limit=100)) == (0, False)
        assert await store.write(cycle_due_job(_us(expiry), limit=100)) == (1, False)
        assert await ledger.credited() == 23  # 7 unused units left; the 3 burned stay
        events = await ledger.read(
            "SELECT name, metadata, epoch_us(timestamp) FROM events WHERE source = 'system'"
            " AND name = 'meter.credit_expired'"
        )
        assert [(n, json.loads(m)["units"], at) for n, m, at in events] == [
            ("meter.credit_expired", 7, _us(expiry))
        ]
        fired = await ledger.read("SELECT type FROM webhook_events WHERE type = 'meter.alert'")
        assert len(fired) == 1  # the balance went from 27 to 20, under 25
        changed = await ledger.read("SELECT customer_id::VARCHAR FROM webhook_state_changes")
        assert (ledger.ref["customer_id"],) in changed
        # Once: again, later, or after a restart, nothing more.
        assert await store.write(cycle_due_job(_us(expiry) + 10**9, limit=100)) == (0, False)
    async with Store(path) as store:
        ledger.store = store
        assert await ledger.credited() == 23
        assert await store.write(cycle_due_job(_us(expiry) + 10**9, limit=100)) == (0, False)
        assert (
            len(await ledger.read("SELECT 1 FROM events WHERE name = 'meter.credit_expired'")) == 1
        )


def test_a_write_after_the_expiry_applies_it_first(tmp_path: Path) -> None:
    """A revocation recorded after a grant's expiry (before the timed write ran) takes nothing
    off it: the expiry is applied first, at its time."""
    asyncio.run(_write_after(tmp_path / "g.duckdb"))


async def _write_after(path: Path) -> None:
    async with Store(path) as store:
        ledger = Ledger(store)
        await ledger.setup()
        expiry = T0 + timedelta(days=1)
        await ledger.credit(T0, "promo", units=10, expires_at=expiry)
        await ledger.credit(T0, "paid", units=5)
        after = await ledger.credit(expiry + timedelta(hours=1), "refund", units=-3)
        assert after.credited == 2  # 10 expired unused, then 3 of the 5 revoked
        assert await store.write(cycle_due_job(_us(expiry) + 10**9, limit=100)) == (0, False)


def test_a_reset_carries_rollover_grants_with_their_expiry(tmp_path: Path) -> None:
    asyncio.run(_reset(tmp_path / "g.duckdb"))


async def _reset(path: Path) -> None:
    async with Store(path) as store:
        ledger = Ledger(store)
        await ledger.setup()
        expiry = T0 + timedelta(days=60)
        await ledger.credit(T0, "a", units=10, rollover=True, priority=5, expires_at=expiry)
        await ledger.credit(T0, "b", units=10)
        await ledger.use(T0, 12)
        data = ResetCreate.model_validate({**ledger.ref, "external_id": "cycle"})
        await store.write(reset_job(ORG, data, _us(T0 + timedelta(days=30))))
        rows = await store.read(
            lambda con: grant_tables.grants_of(
                con, ledger.ref["customer_id"], ledger.ref["meter_id"]
            )
        )
        # Priority 5 burns before the default 100: 10 of a burned, 2 of b; b carries nothing
        # (no rollover), a has nothing left.
        assert rows == []
        assert await ledger.credited() == 0
        await ledger.credit(
            T0 + timedelta(days=30), "c", units=10, rollover=True, expires_at=expiry
        )
        await ledger.use(T0 + timedelta(days=30), 4)
        await store.write(
            reset_job(
                ORG, data.model_copy(update={"external_id": "cycle2"}), _us(T0 + timedelta(days=31))
            )
        )
        rows = await store.read(
            lambda con: grant_tables.grants_of(
                con, ledger.ref["customer_id"], ledger.ref["meter_id"]
            )
        )
        assert [(r.grant.units, r.grant.expires_at_us, r.grant.rollover) for r in rows] == [
            (6, _us(expiry), True)
        ]
        assert await ledger.credited() == 6
        assert await store.write(cycle_due_job(_us(expiry), limit=100)) == (1, False)
        assert await ledger.credited() == 0


def test_active_grants_per_customer_meter_are_bounded(tmp_path: Path) -> None:
    asyncio.run(_bounded(tmp_path / "g.duckdb"))


async def _bounded(path: Path) -> None:
    async with Store(path) as store:
        ledger = Ledger(store)
        await ledger.setup()
        for i in range(MAX_ACTIVE_GRANTS):
            await ledger.credit(
                T0, f"k{i}", units=1, priority=i % 256, expires_at=T0 + timedelta(days=1 + i)
            )
        with pytest.raises(ValidationFailed) as refused:
            await ledger.credit(T0, "one-more", units=1, priority=0)
        assert refused.value.errors[0].loc == ("body", "expires_at")
        # Into an existing grant (the same priority, expiry and rollover), it still fits.
        await ledger.credit(T0, "merged", units=1, priority=0, expires_at=T0 + timedelta(days=1))
        assert await ledger.credited() == MAX_ACTIVE_GRANTS + 1


def test_a_data_dir_from_before_grants_keeps_its_credits(tmp_path: Path) -> None:
    """Credits stored before step 27 (running sums only) become grants: credited, the balance
    and what a reset carries stay what they were."""
    path = tmp_path / "old.duckdb"
    asyncio.run(_old(path))
    con = duckdb.connect(str(path))
    before_segments(con)  # first: the steps below are undone on its tables
    # The data dir as step 26 left it: no grants, only the customer meter's running sums.
    con.execute("DROP TABLE credit_grants")
    con.execute("DELETE FROM schema_migrations WHERE version >= 27")
    con.close()
    asyncio.run(_migrated(path))


async def _old(path: Path) -> None:
    async with Store(path) as store:
        ledger = Ledger(store)
        await ledger.setup()
        await ledger.credit(T0, "plain", units=30)
        await ledger.credit(T0, "roll", units=20, rollover=True)
        await ledger.use(T0, 35)


async def _migrated(path: Path) -> None:
    async with Store(path) as store:
        ledger = Ledger(store)
        rows = await ledger.read(
            "SELECT customer_id::VARCHAR, meter_id::VARCHAR FROM customer_meters"
        )
        ledger.ref = {"customer_id": rows[0][0], "meter_id": rows[0][1]}
        assert await ledger.credited() == 50
        grants = await ledger.read(
            "SELECT units, rollover, priority FROM credit_grants ORDER BY ALL"
        )
        assert grants == [(20, True, 100), (30, False, 100)]
        data = ResetCreate.model_validate({**ledger.ref, "external_id": "cycle"})
        await store.write(reset_job(ORG, data, _us(T0 + timedelta(days=1))))
        assert await ledger.credited() == 15  # Polar's: min(50 - 35, 20)
