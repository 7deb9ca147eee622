"""A start reads the balances back from what the ledger stores (`ledger_log.load`): its
checkpoint and the usage added since. Wherever the last checkpoint was taken, every customer
meter's usage is what the balances held in memory, on the image a crash leaves (a snapshot:
no checkpoint at the stop) and after a clean stop."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.meter_tables import create_job
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import now_us
from tests.aggregator.store.stored_ledger import crash_image
from tests.strategies import examples

ORGS = [str(uuid.uuid4()), str(uuid.uuid4())]
AGGREGATIONS = [
    {"func": "count"},
    {"func": "sum", "property": "n"},
    {"func": "max", "property": "n"},
    {"func": "latest", "property": "n"},
    {"func": "unique", "property": "n"},
]
SUBJECTS = [f"ext:c{i}" for i in range(4)]
# (organization, customer, value) of each event of a request
REQUESTS = st.lists(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3), st.integers(-5, 9)), min_size=1),
    min_size=1,
    max_size=5,
)


def _seen(store: Store, meters: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    out = {}
    for meter_id, func in meters:
        for subject in SUBJECTS:
            usage = store.live.balances.usage(meter_id, [subject])
            out[(meter_id, subject)] = (usage.partial.result(func), usage.first_us, usage.last_us)
    return out


async def _run(path: Path, requests: list[list[tuple[int, int, int]]], fold_after: int) -> None:
    meters: list[tuple[str, str]] = []
    # A checkpoint is taken by hand only (`checkpoint_seconds`): after `fold_after` requests.
    async with Store(path, checkpoint_seconds=3600) as store:
        for org in ORGS:
            for aggregation in AGGREGATIONS:
                definition = MeterCreate.model_validate(
                    {
                        "name": str(aggregation["func"]),
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": aggregation,
                    }
                )
                meter = await store.write(
                    create_job(org, definition, now_us(), meter_id=str(uuid.uuid4()))
                )
                meters.append((meter.id, str(aggregation["func"])))
        for i, request in enumerate(requests):
            for o, org in enumerate(ORGS):
                events = [
                    Event("use", now_us(), None, f"c{c}", None, None, None, {"n": n}, None)
                    for org_index, c, n in request
                    if org_index == o
                ]
                if events:
                    await store.write(IngestJob(org, to_table(events), now_us()))
            if i + 1 == fold_after:
                await store.checkpoint_ledger()
        await store.stored()
        before = _seen(store, meters)
        crashed = path.with_name("crashed.duckdb")
        await crash_image(store, crashed)
    for reopened in (crashed, path):
        async with Store(reopened, checkpoint_seconds=3600) as store:
            assert _seen(store, meters) == before


@pytest.mark.slow
@settings(max_examples=examples(15), deadline=None)
@given(requests=REQUESTS, data=st.data())
def test_a_start_reads_back_the_balances_held_before_the_stop(
    tmp_path_factory: pytest.TempPathFactory,
    requests: list[list[tuple[int, int, int]]],
    data: st.DataObject,
) -> None:
    fold_after = data.draw(st.integers(0, len(requests)))
    path = tmp_path_factory.mktemp("balances") / "m.duckdb"
    asyncio.run(_run(path, requests, fold_after))
