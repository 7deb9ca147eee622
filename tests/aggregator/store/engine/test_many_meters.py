"""An organization with thousands of meters that share filters, as users define them: ingest
evaluates each shared clause, group and contribution once (`MeterPlan`), before the writer
(`Store.prepare`), and every meter's stored quantity is still the reference fold of its
events (`Filter.matches`, `meters.aggregations.fold`)."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from aggregator.store import IngestJob, Store, with_origin
from aggregator.store.base.rows import registered
from aggregator.store.engine.writer import Tx
from aggregator.store.tables.meter_tables import create_job
from aggregator.store.tables.quotas import TenantLimits
from meters.aggregations import fold
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.filters import EventView
from meters.times import now_us

ORG = str(uuid.uuid4())
UNLIMITED = TenantLimits(meters=10**6)
MODELS = [f"model-{i}" for i in range(30)]
ROUTES = [f"/v1/r{i}" for i in range(20)]
REGIONS = ["eu", "us", "ap"]
AGGREGATIONS: list[dict[str, Any]] = [
    {"func": "count"},
    {"func": "sum", "property": "tokens"},
    {"func": "max", "property": "latency"},
    {"func": "min", "property": "latency"},
    {"func": "avg", "property": "tokens"},
    {"func": "unique", "property": "user"},
]


def _clause(prop: str, value: Any, operator: str = "eq") -> dict[str, Any]:
    return {"property": prop, "operator": operator, "value": value}


def _filters() -> list[dict[str, Any]]:
    """500 filters: per model, per route, per model and region, and groups nested in an `or`
    (a route's `like`, or many tokens of a model), sharing clauses and groups."""
    llm = _clause("name", "llm")
    filters: list[dict[str, Any]] = []
    filters += [{"conjunction": "and", "clauses": [llm, _clause("model", m)]} for m in MODELS]
    filters += [{"conjunction": "and", "clauses": [_clause("route", r)]} for r in ROUTES]
    filters += [
        {"conjunction": "and", "clauses": [llm, _clause("model", m), _clause("region", g)]}
        for m in MODELS
        for g in REGIONS
    ]
    filters += [
        {
            "conjunction": "or",
            "clauses": [
                {"conjunction": "and", "clauses": [_clause("route", r, "like"), llm]},
                {
                    "conjunction": "and",
                    "clauses": [_clause("tokens", t, "gt"), _clause("model", m)],
                },
            ],
        }
        for r in ROUTES[:14]
        for m in MODELS
        for t in (100,)
    ]
    # A group of another filter inside a third: the same group evaluated once for both.
    filters.append({"conjunction": "or", "clauses": [filters[0], filters[-1]]})
    return filters[:499] + filters[-1:]


def _meters(filters: list[dict[str, Any]]) -> list[tuple[int, MeterCreate]]:
    """Each filter with every aggregation: (the filter's place, the meter)."""
    return [
        (k, MeterCreate.model_validate({"name": f"meter {k} {a}", "filter": f, "aggregation": a}))
        for k, f in enumerate(filters)
        for a in AGGREGATIONS
    ]


def _events(rng: random.Random, tag: str, count: int) -> list[Event]:
    return [
        Event(
            name=rng.choice(["llm", "api"]),
            timestamp_us=now_us(),
            customer_id=None,
            external_customer_id=f"c{rng.randint(0, 9)}",
            external_id=f"{tag}-{i}",
            parent_id=None,
            external_member_id=None,
            metadata={
                "model": rng.choice(MODELS),
                "route": rng.choice(ROUTES),
                "region": rng.choice(REGIONS),
                # Sometimes text, sometimes missing: not in sum, min, max or avg meters.
                "tokens": rng.choice([rng.randint(0, 300), rng.randint(0, 300), "n/a"]),
                **({"latency": rng.choice([0.5, 12.25, 99.0, 7.0])} if rng.random() < 0.8 else {}),
                "user": f"u{rng.randint(0, 20)}",
            },
            cost_amount=None,
        )
        for i in range(count)
    ]


def _quantities(con: Any) -> dict[str, tuple[float, float, float, float, int]]:
    """Per meter id, over every customer and bucket: (events, sum, min, max, distinct values)."""
    numbers = con.execute(
        "SELECT meter_id::VARCHAR, sum(events), sum(total), min(low), max(high) FROM"
        " all_rollups GROUP BY ALL"
    ).fetchall()
    values = con.execute(
        "SELECT meter_id::VARCHAR, count(DISTINCT value) FROM all_rollup_values GROUP BY ALL"
    ).fetchall()
    out = {m: (float(e), float(t), float(lo), float(hi), 0) for m, e, t, lo, hi in numbers}
    out.update({m: (0.0, 0.0, 0.0, 0.0, int(n)) for m, n in values})
    return out


def _stored(meter: MeterCreate, row: tuple[float, float, float, float, int] | None) -> float:
    """The meter's quantity over all its events, as quantities merge rollup rows."""
    func = meter.aggregation.func
    if row is None:
        return 0.0
    events, total, low, high, distinct = row
    return {
        "count": events,
        "sum": total,
        "min": low,
        "max": high,
        "avg": total / events if events else 0.0,
        "unique": float(distinct),
    }[func]


@pytest.mark.slow
def test_every_meter_of_thousands_equals_the_reference_fold(tmp_path: Path) -> None:
    filters = _filters()
    meters = _meters(filters)
    assert len(meters) == 3000
    rng = random.Random(59)
    requests = [_events(rng, f"r{i}", 100) for i in range(3)]

    async def run() -> tuple[list[str], dict[str, Any]]:
        path = tmp_path / "m.duckdb"
        async with Store(path) as store:

            def make(tx: Tx) -> list[str]:
                # One made as the API makes it, the others copies of its row with their own
                # definitions (3,000 API writes would take most of the test's time).
                ids = [str(uuid.uuid4()) for _ in meters]
                create_job(ORG, meters[0][1], now_us(), UNLIMITED, meter_id=ids[0])(tx)
                made = pa.table(
                    {
                        "id": ids[1:],
                        "name": [m.name for _, m in meters[1:]],
                        "filter": [m.filter.model_dump_json() for _, m in meters[1:]],
                        "aggregation": [m.aggregation.model_dump_json() for _, m in meters[1:]],
                    }
                )
                with registered(tx.con, "_made", made):
                    tx.con.execute(
                        "INSERT INTO meters SELECT m.* REPLACE (d.id::UUID AS id, d.name AS name,"
                        " d.filter AS filter, d.aggregation AS aggregation)"
                        " FROM meters m, _made d WHERE m.id = ?::UUID",
                        [ids[0]],
                    )
                return ids

            ids: list[str] = await store.write(make)
            for events in requests:
                # As the embedded publisher does: evaluated before the writer takes them.
                table = to_table(events)
                prepared = await store.prepare(ORG, with_origin(table, ORG, now_us()))
                assert prepared is not None, "thousands of meters are evaluated beforehand"
                await store.write(IngestJob(ORG, table, now_us(), prepared=prepared))
        async with Store(path) as store:
            return ids, await store.read(_quantities)

    ids, stored = asyncio.run(run())
    views = [
        EventView(e.name, "user", e.timestamp_us, e.metadata) for batch in requests for e in batch
    ]
    # The reference once per filter: the meters share them.
    matched = [
        [v for v in views if meters[6 * k][1].filter.matches(v)] for k in range(len(filters))
    ]
    wrong = []
    for meter_id, (k, meter) in zip(ids, meters, strict=True):
        expected = fold(meter.aggregation, matched[k])
        actual = _stored(meter, stored.get(meter_id))
        if not math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9):
            wrong.append((meter.name, actual, expected))
    assert not wrong, wrong[:10]
