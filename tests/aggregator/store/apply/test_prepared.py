"""Events evaluated for their organization's meters before the writer takes them
(`Store.prepare`) are applied exactly as events the writer evaluates itself: the same rollups,
ledger usage and balances, whatever the duplicates, the grouping of requests into commits, and
a meter made between the evaluation and the commit (the writer then evaluates them again). The
writer evaluates nothing that was prepared for the meters it finds. (The store prepares only
organizations of many meters; these tests have it prepare every one.)"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine.ingest_log import with_origin
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
# What was stored and is held in memory, without the times of ingest.
STORED = {
    "rollups": "SELECT meter_id, subject, bucket, sum(events), sum(total), min(low), max(high)"
    " FROM all_rollups GROUP BY ALL",
    "rollup_values": "SELECT DISTINCT * FROM all_rollup_values",
    # The ledger's files: its checkpoint and the usage added since (no other change here).
    "ledger": "SELECT meter_id, subject, sum(events), sum(total), min(low), max(high)"
    " FROM checkpointed_ledger_usage GROUP BY ALL",
    "ledger_values": "SELECT DISTINCT * FROM checkpointed_ledger_usage_values",
    "events": "SELECT seq, external_id, external_customer_id FROM events",
}
Request = list[Event]


def _event(view: EventView, customer: int, key: int | None) -> Event:
    return Event(
        name=view.name,
        timestamp_us=now_us(),
        customer_id=None,
        external_customer_id=f"c{customer}",
        external_id=None if key is None else f"e{key}",
        parent_id=None,
        external_member_id=None,
        metadata={k: v for k, v in view.metadata.items() if not k.startswith("_")},
        cost_amount=None,
    )


class _WriterEvaluations:
    """Counts the evaluations of meters run on the writer's thread."""

    def __init__(self) -> None:
        self.count = 0
        self._evaluated = rollups._evaluated

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "duckdb-writer":
            self.count += 1
        return self._evaluated(*args, **kwargs)


async def _applied(
    path: Path, meters: list[MeterCreate], requests: list[Request], late: MeterCreate, prepare: bool
) -> tuple[dict[str, list[Any]], int]:
    """The store after `requests` (the first half together, then the rest, with `late` made
    after the last one was prepared), and how often the writer evaluated meters."""
    counted = _WriterEvaluations()
    async with Store(path, prepared_meters=0) as store:
        for meter in meters:
            await store.write(
                create_job(ORG, meter, now_us(), UNLIMITED, meter_id=str(uuid.uuid4()))
            )

        async def job(events: Request) -> IngestJob:
            at = now_us()
            table = to_table(events)
            prepared = await store.prepare(ORG, with_origin(table, ORG, at)) if prepare else None
            return IngestJob(ORG, table, at, None, prepared)

        half = len(requests) // 2
        with mock.patch.object(rollups, "_evaluated", counted):
            first = [await job(r) for r in requests[:half]]
            await asyncio.gather(*(store.write(j, weight=10, tenant=ORG) for j in first))
            evaluations = counted.count
            last = [await job(r) for r in requests[half:]]
            await store.write(
                create_job(ORG, late, now_us(), UNLIMITED, meter_id=str(uuid.uuid4()))
            )
            for j in last:
                await store.write(j, weight=10, tenant=ORG)

        def read(con: Any) -> dict[str, list[Any]]:
            names = dict(con.execute("SELECT id, name FROM meters").fetchall())
            found = {}
            for table, query in STORED.items():
                rows = con.execute(query).fetchall()
                found[table] = sorted(
                    (names.get(r[0], r[0]), *r[1:]) if table != "events" else r for r in rows
                )
            return found

        return await store.read(read), evaluations


@pytest.mark.slow
@settings(max_examples=examples(15), deadline=None)
@given(
    definitions=st.lists(st.tuples(filters, aggregations), min_size=1, max_size=6),
    requests=st.lists(
        st.lists(
            st.tuples(events(), st.integers(0, 2), st.one_of(st.none(), st.integers(0, 6))),
            min_size=1,
            max_size=6,
        ),
        min_size=2,
        max_size=6,
    ),
)
def test_prepared_events_apply_as_the_writer_applies_them(
    tmp_path_factory: pytest.TempPathFactory,
    definitions: list[tuple[dict[str, Any], dict[str, Any]]],
    requests: list[list[tuple[EventView, int, int | None]]],
) -> None:
    meters = [
        MeterCreate.model_validate({"name": f"meter {i}", "filter": f, "aggregation": a})
        for i, (f, a) in enumerate(definitions)
    ]
    late = MeterCreate.model_validate(
        {"name": "late meter", "filter": definitions[0][0], "aggregation": {"func": "count"}}
    )
    batches = [[_event(*e) for e in request] for request in requests]
    folder = tmp_path_factory.mktemp("prepared")
    evaluated, _ = asyncio.run(_applied(folder / "writer.duckdb", meters, batches, late, False))
    prepared, in_writer = asyncio.run(
        _applied(folder / "prepared.duckdb", meters, batches, late, True)
    )
    assert prepared == evaluated
    assert in_writer == 0
