"""No background work holds the writer past its job bound: backfills of many meters over a
large store take turns in small chunks, so another tenant's writes go in between."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from aggregator.background import Backfiller
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.meter_tables import create_job, pending_backfills
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import now_us

ORG_A, ORG_B = str(uuid.uuid4()), str(uuid.uuid4())
EVERYTHING = {"conjunction": "and", "clauses": []}
AGGREGATIONS = [
    {"func": "sum", "property": "tokens"},
    {"func": "count"},
    {"func": "max", "property": "tokens"},
    {"func": "unique", "property": "model"},
]


def _events(n: int, start: int) -> list[Event]:
    return [
        Event(
            name="e",
            timestamp_us=now_us() - (start + i) * 1_000_000,
            customer_id=None,
            external_customer_id=f"c{(start + i) % 500}",
            external_id=None,
            parent_id=None,
            external_member_id=None,
            metadata={"tokens": i % 7, "model": f"m{i % 13}"},
            cost_amount=None,
        )
        for i in range(n)
    ]


@pytest.mark.serial  # it measures how long writes wait
def test_backfills_of_many_meters_leave_room_for_other_writes(tmp_path: Path) -> None:
    asyncio.run(_backfills(tmp_path))


async def _backfills(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb") as store:
        for start in range(0, 50_000, 25_000):
            table = to_table(_events(25_000, start))
            await store.write(IngestJob(ORG_A, table, now_us()))
        store.writer.job_bound_seconds = 0.1
        store.writer.longest_seconds = 0.0
        async with Backfiller(store) as backfiller:
            for i, aggregation in enumerate(AGGREGATIONS):
                data = MeterCreate.model_validate(
                    {"name": f"meter {i}", "filter": EVERYTHING, "aggregation": aggregation}
                )
                meter = await store.write(
                    create_job(ORG_A, data, now_us(), meter_id=str(uuid.uuid4()))
                )
                backfiller.start(meter.id, meter.version)
            waits = []
            while await store.read(pending_backfills):
                started = time.perf_counter()
                await store.write(IngestJob(ORG_B, to_table(_events(1, 0)), now_us()))
                waits.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
        assert len(waits) > 5  # the backfills took many steps
        # Wide margins (shared, noisy machines): in one step per meter, each took seconds.
        assert store.writer.longest_seconds < 1.0, store.writer.longest_seconds
        assert max(waits) < 1.5, max(waits)
