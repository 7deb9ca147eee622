"""Credit plan cycles across month ends, and a process down over two boundaries: the missed
cycles run once at the next start, never twice."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aggregator.background import PlanCycler
from aggregator.store import Store
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.meter_tables import create_job
from aggregator.store.tables.plan_tables import PlanRow, get_plan, plan_create_job
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.ledger_rules import PlanCreate
from meters.times import EPOCH

ORG = "2d7e4b1a-9c3f-4e8b-a5d6-7f1e0c2b3a44"


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def test_missed_boundaries_run_once_after_a_restart(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path / "plans.duckdb"))


async def _plan(store: Store, start: datetime, now: datetime) -> PlanRow:
    """A monthly plan of 10 credits on a count meter, created at `now`."""
    customer = await store.write(
        create_customer(
            ORG, CustomerCreate(email="p@example.com"), _us(now), customer_id=str(uuid.uuid4())
        )
    )
    meter = await store.write(
        create_job(
            ORG,
            MeterCreate.model_validate(
                {
                    "name": "calls",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "count"},
                }
            ),
            _us(now),
            meter_id=str(uuid.uuid4()),
        )
    )
    plan, _ = await store.write(
        plan_create_job(
            ORG,
            PlanCreate(
                customer_id=uuid.UUID(customer.id),
                meter_id=uuid.UUID(meter.id),
                units=10,
                interval="month",
                starts_at=start,
                external_id="monthly",
            ),
            _us(now),
            plan_id=str(uuid.uuid4()),
        )
    )
    assert isinstance(plan, PlanRow)
    return plan


async def _scenario(path: Path) -> None:
    start = datetime(2025, 1, 31, tzinfo=UTC)
    now = start
    async with Store(path) as store:
        plan = await _plan(store, start, now)
        assert plan.cycles == 1  # January 31st, at creation
    # Down from February 1st to April 1st: February 28th and March 31st were missed.
    now = datetime(2025, 4, 1, tzinfo=UTC)
    for _ in range(2):  # the second start must find nothing left to do
        async with Store(path) as store, PlanCycler(store, clock=lambda: _us(now)) as cycler:
            assert await cycler.run_due() == 0  # entering already caught up
            plan = await store.read(get_plan, ORG, plan.id)
            assert plan is not None and plan.cycles == 3
            assert plan.next_cycle_at_us == _us(datetime(2025, 4, 30, tzinfo=UTC))
            rows = await store.read(
                lambda con: con.execute(
                    "SELECT name, epoch_us(timestamp) FROM events WHERE source = 'system'"
                    " ORDER BY seq"
                ).fetchall()
            )
    boundaries = [_us(datetime(2025, m, d, tzinfo=UTC)) for m, d in ((1, 31), (2, 28), (3, 31))]
    assert rows == [(name, at) for at in boundaries for name in ("meter.reset", "meter.credited")]


@pytest.mark.serial  # it measures how long the writer is held
def test_a_long_downtime_is_caught_up_in_jobs_of_bounded_time(tmp_path: Path) -> None:
    asyncio.run(_ten_years_later(tmp_path / "plans.duckdb"))


async def _ten_years_later(path: Path) -> None:
    start = datetime(2025, 1, 31, tzinfo=UTC)
    async with Store(path) as store:
        plan = await _plan(store, start, start)
    later = datetime(2035, 2, 1, tzinfo=UTC)  # 120 boundaries missed
    async with Store(path) as store:
        store.writer.job_bound_seconds = 0.02
        store.writer.longest_seconds = 0.0
        commits = store.writer.commits
        async with PlanCycler(store, clock=lambda: _us(later)):
            pass
        # In one job, the 120 cycles held the writer for seconds; in bounded ones, every
        # other tenant's writes go in between (a wide margin: shared, noisy machines).
        assert store.writer.commits - commits > 2
        assert store.writer.longest_seconds < 0.5, store.writer.longest_seconds
        caught_up = await store.read(get_plan, ORG, plan.id)
        assert caught_up is not None and caught_up.cycles == 121
