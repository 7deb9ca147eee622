"""Meters' distinct clauses and contributions are evaluated `COLUMNS_PER_STATEMENT` to a
statement (DuckDB dies on one statement of thousands of expressions): what is stored must not
depend on where they are cut."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.metering import rollups
from aggregator.store.tables.meter_tables import create_job
from aggregator.store.tables.quotas import TenantLimits
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.filters import EventView
from meters.times import now_us
from tests.aggregator.store.metering.test_meter_sql import aggregations, events, filters
from tests.strategies import examples

ORG = str(uuid.uuid4())
UNLIMITED = TenantLimits(meters=10**6)
STORED = (
    "SELECT meter_id, subject, bucket, sum(events), sum(total), min(low), max(high)"
    " FROM all_rollups GROUP BY ALL ORDER BY ALL",
    "SELECT DISTINCT * FROM all_rollup_values ORDER BY ALL",
)


def _event(view: EventView, customer: int) -> Event:
    return Event(
        name=view.name,
        timestamp_us=now_us(),
        customer_id=None,
        external_customer_id=f"c{customer}",
        external_id=None,
        parent_id=None,
        external_member_id=None,
        metadata={k: v for k, v in view.metadata.items() if not k.startswith("_")},
        cost_amount=None,
    )


async def _stored(
    path: Path, meters: list[MeterCreate], batch: list[Event]
) -> tuple[list[Any], list[Any]]:
    async with Store(path) as store:
        for meter in meters:
            await store.write(
                create_job(ORG, meter, now_us(), UNLIMITED, meter_id=str(uuid.uuid4()))
            )
        await store.write(IngestJob(ORG, to_table(batch), now_us()))

        def read(con: Any) -> tuple[list[Any], list[Any]]:
            numbers, values = (con.execute(q).fetchall() for q in STORED)
            # Meter ids differ between the two stores: compare by name.
            order = {
                r[0]: i
                for i, r in enumerate(con.execute("SELECT id FROM meters ORDER BY name").fetchall())
            }
            return (
                sorted((order[r[0]], *r[1:]) for r in numbers),
                sorted((order[r[0]], *r[1:]) for r in values),
            )

        return await store.read(read)


@pytest.mark.slow
@settings(max_examples=examples(10), deadline=None)
@given(
    definitions=st.lists(st.tuples(filters, aggregations), min_size=1, max_size=7),
    views=st.lists(st.tuples(events(), st.integers(0, 2)), min_size=1, max_size=10),
    per_statement=st.integers(1, 3),
)
def test_rollups_do_not_depend_on_how_meters_are_cut_into_statements(
    tmp_path_factory: pytest.TempPathFactory,
    definitions: list[tuple[dict[str, Any], dict[str, Any]]],
    views: list[tuple[EventView, int]],
    per_statement: int,
) -> None:
    meters = [
        MeterCreate.model_validate({"name": f"meter {i}", "filter": f, "aggregation": a})
        for i, (f, a) in enumerate(definitions)
    ]
    batch = [_event(view, customer) for view, customer in views]
    folder = tmp_path_factory.mktemp("rollups")
    whole = asyncio.run(_stored(folder / "whole.duckdb", meters, batch))
    with mock.patch.object(rollups, "COLUMNS_PER_STATEMENT", per_statement):
        cut = asyncio.run(_stored(folder / "cut.duckdb", meters, batch))
    assert cut == whole
