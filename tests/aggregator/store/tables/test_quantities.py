"""Quantities from rollups equal the reference fold over raw events, whatever the batching."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.machinery.compaction import CLUSTERED, compact, recluster
from aggregator.store.machinery.recluster import ReclusterSettings
from aggregator.store.tables.meter_tables import backfill_step_job, create_job
from aggregator.store.tables.quantities import Scope, compute
from meters.aggregations import Aggregation, fold
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.filters import EventView
from meters.periods import boundaries
from meters.times import EPOCH

ORG = "5f0d3a8e-1f64-4a39-9d6e-5b7c2a0f1e11"
NEVER = ReclusterSettings(min_rows=10**12)  # rollups rewritten only where the test says
# Around the 2025 US DST start (March 9) and a month boundary.
WINDOW = (
    (datetime(2025, 2, 26, tzinfo=UTC) - EPOCH).total_seconds(),
    (datetime(2025, 3, 12, tzinfo=UTC) - EPOCH).total_seconds(),
)
ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu"]
AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


moments = st.integers(_us(WINDOW[0]), _us(WINDOW[1]))


@st.composite
def event_lists(draw: st.DrawFn) -> list[Event]:
    n = draw(st.integers(0, 30))
    events = []
    for i in range(n):
        metadata: dict[str, Any] = {}
        value = draw(st.one_of(st.none(), st.integers(-5, 50), st.sampled_from([0.5, "x", True])))
        if value is not None:
            metadata["v"] = value
        tag = draw(st.sampled_from([None, "p", "q"]))
        if tag is not None:
            metadata["tag"] = tag
        events.append(
            Event(
                name=draw(st.sampled_from(["a", "b"])),
                # Some events right on 15-minute bucket edges.
                timestamp_us=draw(moments | moments.map(lambda m: m - m % (15 * 60 * 10**6))),
                customer_id=None,
                external_customer_id=draw(st.sampled_from(["c1", "c2"])),
                external_id=f"e{i}",
                parent_id=None,
                external_member_id=None,
                metadata=metadata,
                cost_amount=None,
            )
        )
    return events


meter_definitions = st.fixed_dictionaries(
    {
        "filter": st.sampled_from(
            [
                {"conjunction": "and", "clauses": []},
                {
                    "conjunction": "and",
                    "clauses": [{"property": "name", "operator": "eq", "value": "a"}],
                },
            ]
        ),
        "aggregation": st.one_of(
            st.just({"func": "count"}),
            st.sampled_from(["sum", "avg", "min", "max", "unique"]).map(
                lambda f: {"func": f, "property": "v"}
            ),
        ),
    }
)


def _view(event: Event) -> EventView:
    return EventView(event.name, "user", event.timestamp_us, event.metadata)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=event_lists(),
    definition=meter_definitions,
    split=st.integers(0, 30),
    batch_sizes=st.lists(st.integers(1, 7), min_size=1),
    shuffle=st.randoms(use_true_random=False),
    start=moments,
    length=st.integers(0, 6 * 86_400 * 10**6),
    interval=st.sampled_from(["hour", "day", "week", "month"]),
    zone=st.sampled_from(ZONES),
    compact_after=st.sets(st.integers(0, 12)),
    customer=st.sampled_from([None, "c1"]),
    tag=st.sampled_from([None, "p"]),
    near=st.tuples(st.integers(-1, 29), st.integers(-1, 29)),
    offsets=st.tuples(st.integers(0, 2 * 3600 * 10**6), st.integers(0, 2 * 3600 * 10**6)),
)
@pytest.mark.slow
def test_quantities_from_rollups_equal_the_fold_over_events(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[Event],
    definition: dict[str, Any],
    split: int,
    batch_sizes: list[int],
    shuffle: Any,
    start: int,
    length: int,
    interval: str,
    zone: str,
    compact_after: set[int],
    customer: str | None,
    tag: str | None,
    near: tuple[int, int],
    offsets: tuple[int, int],
) -> None:
    """Also with the appended deltas compacted, and the rollups rewritten sorted, after any of
    the ingest and backfill steps (`compact_after`, by step number): a reader merges the same
    partials either way. Scoped
    to one customer, to a metadata value (read from the events, not the rollups), or both."""
    if interval == "hour":
        length = min(length, 7 * 86_400 * 10**6)
    end = start + length
    # Ends close after / before an event (`near`: which one, -1 for none), so that the events
    # in the parts of buckets at the range's edges matter.
    if events and near[0] >= 0:
        start = events[near[0] % len(events)].timestamp_us - offsets[0]
    if events and near[1] >= 0:
        end = max(start, events[near[1] % len(events)].timestamp_us + offsets[1])
    if interval == "hour":
        end = min(end, start + 7 * 86_400 * 10**6)
    order = list(events)
    shuffle.shuffle(order)
    before, after = order[:split], order[split:]
    meter_create = MeterCreate.model_validate({"name": "meter", **definition})

    async def run() -> tuple[list[tuple[datetime, float]], float]:
        path = tmp_path_factory.mktemp("q") / "m.duckdb"
        async with Store(path, compact_seconds=3600, recluster=NEVER) as store:
            steps = iter(range(10**6))

            async def step(job: Any) -> Any:
                result = await store.write(job)
                if next(steps) in compact_after:
                    await store.write(lambda tx: compact(tx.con))
                    for table in CLUSTERED:
                        await store.read(recluster, table)
                return result

            await _ingest(step, store, before, batch_sizes)
            meter = await store.write(create_job(ORG, meter_create, 0, meter_id=str(uuid.uuid4())))
            while True:  # the backfill, a small chunk per writer job
                progress = await step(backfill_step_job(meter.id, meter.version, 7))
                if progress is None or progress[0] >= progress[1]:
                    break
            await _ingest(step, store, after, batch_sizes)
            scope = Scope(
                meter,
                None if customer is None else (f"ext:{customer}",),
                () if tag is None else (("tag", (tag,)),),
            )
            return await store.read(compute, scope, start, end, interval, ZoneInfo(zone), None)

    periods, total = asyncio.run(run())

    aggregation = meter_create.aggregation
    matching = [
        _view(e)
        for e in events
        if meter_create.filter.matches(_view(e))
        and customer in (None, e.external_customer_id)
        and tag in (None, e.metadata.get("tag"))
    ]
    edges = boundaries(
        EPOCH + (start * _ONE_US),
        EPOCH + (end * _ONE_US),
        interval,
        ZoneInfo(zone),  # type: ignore[arg-type]
    )
    assert [p for p, _ in periods] == edges[:-1]
    for i, (_, quantity) in enumerate(periods):
        lo = _to_us(edges[i])
        hi = _to_us(edges[i + 1])
        expected = fold(aggregation, [e for e in matching if lo <= e.timestamp_us < hi])
        assert math.isclose(quantity, expected, rel_tol=1e-9, abs_tol=1e-9), (i, quantity, expected)
    expected_total = fold(aggregation, [e for e in matching if start <= e.timestamp_us <= end])
    assert math.isclose(total, expected_total, rel_tol=1e-9, abs_tol=1e-9)


_ONE_US = timedelta(microseconds=1)


def _to_us(moment: datetime) -> int:
    return (moment - EPOCH) // _ONE_US


async def _ingest(
    write: Callable[[Any], Awaitable[Any]], store: Store, events: list[Event], sizes: list[int]
) -> None:
    i = 0
    k = 0
    while i < len(events):
        size = sizes[k % len(sizes)]
        chunk = events[i : i + size]
        await write(IngestJob(ORG, to_table(chunk), 0))
        i += size
        k += 1
