"""Rollup-mode forwarding staged per group of a meter's dimensions (`forward_rollups`, decision
19): one event per meter, customer, period and group of a dimensioned meter's values, each
value named in its metadata, whose units add up to the meter's; a meter without dimensions as
before (its external ids unchanged); turning it on for a meter forwarded whole before takes the
whole back and sends the groups; a data dir of schema step 33 stages on from what it forwarded."""

from __future__ import annotations

import asyncio
import collections
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables import forward_rollups
from aggregator.store.tables.meter_tables import backfill_step_job, create_job
from meters.definitions import MeterCreate
from meters.events import EventRules, parse_ingest_body, to_table
from meters.times import datetime_to_us, now_us
from tests.aggregator.store.schema_before import before_forwarded_groups

ORG = str(uuid.uuid4())
ALL: dict[str, Any] = {"conjunction": "and", "clauses": []}
BASE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
MODELS = ("gpt-4o", "gpt-4o-mini", None)


async def _setup(store: Store) -> dict[str, str]:
    meters = {}
    for name, aggregation, dimensions in [
        ("tokens", {"func": "sum", "property": "tokens"}, ["model", "region"]),
        ("calls", {"func": "count"}, []),
    ]:
        data = MeterCreate.model_validate(
            {"name": name, "filter": ALL, "aggregation": aggregation, "dimensions": dimensions}
        )
        meter = await store.write(create_job(ORG, data, now_us(), meter_id=str(uuid.uuid4())))
        await store.write(backfill_step_job(meter.id, 1, 1000))
        meters[name] = meter.id
    events = [
        {
            "name": "call",
            "external_customer_id": f"c{i % 2}",
            "external_id": f"e{i}",
            "timestamp": (BASE + timedelta(minutes=11 * i)).isoformat(),
            "metadata": {
                "tokens": i + 1,
                "region": "eu",
                **({"model": MODELS[i % 3]} if MODELS[i % 3] else {}),
            },
        }
        for i in range(15)
    ]
    table = to_table(parse_ingest_body({"events": events}, now=now_us(), rules=EventRules()))
    await store.write(IngestJob(ORG, table, now_us()), weight=table.num_rows)
    return meters


async def _stage(store: Store, by_dimension: bool) -> list[dict[str, Any]]:
    cutoff = datetime_to_us(BASE + timedelta(hours=4))
    job = forward_rollups.stage_job(ORG, 60, cutoff, {}, now_us(), by_dimension)
    await store.write(job)
    return [p.event for p in await store.read(forward_rollups.pending, ORG, 1000)]


def _totals(events: list[dict[str, Any]]) -> collections.Counter[tuple[str, str]]:
    found: collections.Counter[tuple[str, str]] = collections.Counter()
    for e in events:
        found[e["external_customer_id"], e["metadata"]["meter_id"]] += e["metadata"]["units"]
    return found


EXPECTED = {
    ("c0", "tokens"): sum(i + 1 for i in range(0, 15, 2)),
    ("c1", "tokens"): sum(i + 1 for i in range(1, 15, 2)),
    ("c0", "calls"): 8,
    ("c1", "calls"): 7,
}


def test_a_dimensioned_meters_periods_go_per_group(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            meters = await _setup(store)
            names = {v: k for k, v in meters.items()}
            sent = await _stage(store, by_dimension=True)
            tokens = [e for e in sent if e["metadata"]["meter_id"] == meters["tokens"]]
            calls = [e for e in sent if e["metadata"]["meter_id"] == meters["calls"]]
            assert {(c, names[m]): u for (c, m), u in _totals(sent).items()} == EXPECTED
            # A group per (customer, hour, model): its values named, a null one left out.
            per_group = collections.Counter(
                (e["external_customer_id"], e["timestamp"], e["metadata"].get("model"))
                for e in tokens
            )
            assert max(per_group.values()) == 1
            assert {e["metadata"].get("model") for e in tokens} == set(MODELS)
            assert all(e["metadata"]["region"] == "eu" for e in tokens)
            assert len({e["external_id"] for e in tokens}) == len(tokens)
            # The meter without dimensions: as it was, ids of the form they had.
            assert all("model" not in e["metadata"] for e in calls)
            assert all(e["external_id"].count(":") == 5 for e in calls)

    asyncio.run(run())


def test_turned_on_it_takes_back_the_whole_and_sends_the_groups(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            meters = await _setup(store)
            whole = await _stage(store, by_dimension=False)
            assert all("model" not in e["metadata"] for e in whole)
            assert await _stage(store, by_dimension=False) == whole  # nothing changed since
            both = await _stage(store, by_dimension=True)
            again = both[len(whole) :]
            taken_back = [e for e in again if e["metadata"]["units"] < 0]
            assert {e["metadata"]["meter_id"] for e in taken_back} == {meters["tokens"]}
            names = {v: k for k, v in meters.items()}
            assert {(c, names[m]): u for (c, m), u in _totals(both).items()} == EXPECTED

    asyncio.run(run())


def test_a_data_dir_of_schema_33_stages_on_from_what_it_forwarded(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"

    async def make() -> list[dict[str, Any]]:
        async with Store(path) as store:
            await _setup(store)
            return await _stage(store, by_dimension=False)

    async def reopen() -> list[dict[str, Any]]:
        async with Store(path) as store:
            return await _stage(store, by_dimension=False)

    staged = asyncio.run(make())
    con = duckdb.connect(str(path))
    before_forwarded_groups(con)
    con.close()
    assert asyncio.run(reopen()) == staged  # no new revision: the same totals were forwarded
