"""Quantities from rollups equal the reference fold over raw events, whatever the batching and
the order events arrive in (latest and integral meters too: late events change the point a
bucket or a period holds)."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.meter_tables import backfill_step_job, create_job
from aggregator.store.tables.quantities import Scope, compute
from meters.aggregations import Aggregation, IntegralAggregation, fold
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.filters import EventView
from meters.periods import boundaries
from meters.times import EPOCH
from tests.strategies import examples

ORG = "5f0d3a8e-1f64-4a39-9d6e-5b7c2a0f1e11"
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
CROWDED = [_us(WINDOW[0]) + 5 * 86_400 * 10**6 + s * 10**6 for s in (0, 1, 60, 61)]


@st.composite
def event_lists(draw: st.DrawFn, within: st.SearchStrategy[int] = moments) -> list[Event]:
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
                # Some events right on 15-minute bucket edges, some at the same few instants
                # of one bucket (ties, and several points in a bucket).
                timestamp_us=draw(
                    within
                    | within.map(lambda m: m - m % (15 * 60 * 10**6))
                    | st.sampled_from(CROWDED)
                ),
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
            st.just({"func": "latest", "property": "v"}),
            st.sampled_from(["second", "hour", "day"]).map(
                lambda per: {"func": "integral", "property": "v", "per": per}
            ),
        ),
    }
)


def _view(event: Event) -> EventView:
    return EventView(event.name, "user", event.timestamp_us, event.metadata)


@settings(
    max_examples=examples(20),
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
    now=moments,
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
    now: int,
) -> None:
    """Also with the ledger's checkpoint taken, and the rollups rewritten sorted, after any of
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
    meter_create = MeterCreate.model_validate({"name": "meter", **definition})
    periods, total = _quantities(
        tmp_path_factory,
        events,
        meter_create,
        Arrivals(split, batch_sizes, shuffle, compact_after),
        (customer, tag),
        (start, end, interval, zone, now),
    )

    _check(events, meter_create, (customer, tag), (start, end, interval, zone, now), periods, total)


def _check(
    events: list[Event],
    meter_create: MeterCreate,
    scoped: tuple[str | None, str | None],
    window: tuple[int, int, str, str, int],
    periods: list[tuple[datetime, float]],
    total: float,
    summed: bool = False,
) -> None:
    """Each period's quantity and the total equal the reference over the raw events."""
    customer, tag = scoped
    start, end, interval, zone, now = window
    aggregation = meter_create.aggregation
    matching = [
        (_view(e), e.external_customer_id)
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

    def expect(lo: int, hi: int) -> float:
        """The reference over [lo, hi): an integral's per customer (from all its events
        before hi, up to now), added up."""
        if summed and not isinstance(aggregation, IntegralAggregation):
            return math.fsum(
                fold(
                    aggregation, [e for e, c in matching if c == who and lo <= e.timestamp_us < hi]
                )
                for who in ("c1", "c2")
            )
        if not isinstance(aggregation, IntegralAggregation):
            return fold(aggregation, [e for e, _ in matching if lo <= e.timestamp_us < hi])
        parts = [
            fold(
                aggregation, [e for e, c in matching if c == who], start_us=lo, end_us=min(hi, now)
            )
            for who in ("c1", "c2")
        ]
        return math.fsum(parts)

    for i, (_, quantity) in enumerate(periods):
        expected = expect(_to_us(edges[i]), _to_us(edges[i + 1]))
        assert math.isclose(quantity, expected, rel_tol=1e-9, abs_tol=1e-6), (i, quantity, expected)
    assert math.isclose(total, expect(start, end + 1), rel_tol=1e-9, abs_tol=1e-6)


CROWD_START = _us(WINDOW[0]) + 5 * 86_400 * 10**6


@settings(
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # On a 5-minute grid: three instants a bucket, several events at each.
    events=event_lists(st.integers(0, 36).map(lambda i: CROWD_START + i * 5 * 60 * 10**6)),
    aggregation=st.sampled_from(
        [
            {"func": "latest", "property": "v"},
            {"func": "integral", "property": "v", "per": "second"},
            {"func": "integral", "property": "v"},
        ]
    ),
    split=st.integers(0, 30),
    batch_sizes=st.lists(st.integers(1, 7), min_size=1),
    shuffle=st.randoms(use_true_random=False),
    offsets=st.tuples(
        st.integers(-3600 * 10**6, 4 * 3600 * 10**6), st.integers(0, 4 * 3600 * 10**6)
    ),
    interval=st.sampled_from(["hour", "day"]),
    zone=st.sampled_from(ZONES),
    compact_after=st.sets(st.integers(0, 12)),
    customer=st.sampled_from([None, "c1"]),
    tag=st.sampled_from([None, "p"]),
    now=st.integers(CROWD_START, CROWD_START + 5 * 3600 * 10**6),
    summed=st.booleans(),
)
@pytest.mark.slow
def test_latest_and_integral_over_crowded_buckets_equal_the_reference(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[Event],
    aggregation: dict[str, Any],
    split: int,
    batch_sizes: list[int],
    shuffle: Any,
    offsets: tuple[int, int],
    interval: str,
    zone: str,
    compact_after: set[int],
    customer: str | None,
    tag: str | None,
    now: int,
    summed: bool,
) -> None:
    """The aggregations that depend on when events happened, over three hours of events (a
    dozen buckets, several points in each, ties at one instant), arriving in any order and in
    any batches, late ones included: a bucket's latest point, and the value an integral
    carries across bucket and period edges, come out as the reference's."""
    meter_create = MeterCreate.model_validate(
        {
            "name": "meter",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": aggregation,
        }
    )
    start = CROWD_START + offsets[0]
    end = start + offsets[1]
    window = (start, end, interval, zone, now)
    arrivals = Arrivals(split, batch_sizes, shuffle, compact_after)
    periods, total = _quantities(
        tmp_path_factory, events, meter_create, arrivals, (customer, tag), window, summed
    )
    _check(events, meter_create, (customer, tag), window, periods, total, summed)


@dataclass(frozen=True)
class Arrivals:
    """How events reach the store: shuffled, `split` of them before the meter exists (then
    backfilled), in batches of `sizes`, checkpointed and rewritten after the steps numbered in
    `compact_after`."""

    split: int
    sizes: list[int]
    shuffle: Any
    compact_after: set[int]


def _quantities(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[Event],
    meter_create: MeterCreate,
    arrivals: Arrivals,
    scoped: tuple[str | None, str | None],
    window: tuple[int, int, str, str, int],
    summed: bool = False,
) -> tuple[list[tuple[datetime, float]], float]:
    """The quantities a store answers for `window` (start, end, interval, zone, now), scoped to
    a customer and a tag, after the events arrived as `arrivals` says; `summed`: each
    customer's, added up (`customer_aggregation_function=sum`)."""
    order = list(events)
    arrivals.shuffle.shuffle(order)
    before, after = order[: arrivals.split], order[arrivals.split :]
    customer, tag = scoped
    start, end, interval, zone, now = window

    async def run() -> tuple[list[tuple[datetime, float]], float]:
        path = tmp_path_factory.mktemp("q") / "m.duckdb"
        # Segments merged only where the test says: two files of a level are due.
        async with Store(
            path, checkpoint_seconds=3600, merge_fanout=2, merge_check_seconds=3600
        ) as store:
            steps = iter(range(10**6))

            async def step(job: Any) -> Any:
                result = await store.write(job)
                if next(steps) in arrivals.compact_after:
                    await store.checkpoint_ledger()
                    await store.read(lambda _: None)  # every applied event in a file
                    while await asyncio.to_thread(store.merger.merge_once):
                        pass
                return result

            await _ingest(step, store, before, arrivals.sizes)
            meter = await store.write(create_job(ORG, meter_create, 0, meter_id=str(uuid.uuid4())))
            while True:  # the backfill, a small chunk per writer job
                progress = await step(backfill_step_job(meter.id, meter.version, 7))
                if progress is None or progress[0] >= progress[1]:
                    break
            await _ingest(step, store, after, arrivals.sizes)
            scope = Scope(
                meter,
                None if customer is None else (f"ext:{customer}",),
                () if tag is None else (("tag", (tag,)),),
                by_customer=summed,
            )
            across = "sum" if summed else None
            return await store.read(
                compute, scope, start, end, interval, ZoneInfo(zone), across, now
            )

    return asyncio.run(run())


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


def _event(i: int, seconds: int, value: float, customer: str = "c1") -> Event:
    return Event(
        name="a",
        timestamp_us=CROWD_START + seconds * 10**6,
        customer_id=None,
        external_customer_id=customer,
        external_id=f"e{i}",
        parent_id=None,
        external_member_id=None,
        metadata={"v": value},
        cost_amount=None,
    )


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        # c1's latest is 9 (at 3 s, the greater of 9 and 6), c2's 1: summed, 10.
        ({"func": "latest", "property": "v"}, 10.0),
        # c1 holds 5 for 1 s, 2 for 1 s, then 9 until now (3,597 s); c2 holds 1 from 4 s.
        ({"func": "integral", "property": "v", "per": "second"}, 5 + 2 + 9 * 3597 + 3596),
    ],
)
def test_a_late_batch_changes_a_bucket_it_shares(
    tmp_path_factory: pytest.TempPathFactory, aggregation: dict[str, Any], expected: float
) -> None:
    """Points of one customer in one bucket, some arriving in a later batch between and at the
    instants of earlier ones, each quantity read after every batch."""
    events = [
        _event(1, 1, 5),
        _event(2, 3, 6),
        _event(3, 2, 2),
        _event(4, 3, 9),
        _event(5, 4, 1, "c2"),
    ]
    meter_create = MeterCreate.model_validate(
        {
            "name": "meter",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": aggregation,
        }
    )
    arrivals = Arrivals(0, [2, 3], random.Random(0), set())
    arrivals.shuffle.shuffle = lambda order: None  # the order above
    window = (CROWD_START, CROWD_START + 3600 * 10**6 - 1, "day", "UTC", CROWD_START + 3600 * 10**6)
    periods, total = _quantities(
        tmp_path_factory, events, meter_create, arrivals, (None, None), window, summed=True
    )
    assert total == pytest.approx(expected)
    _check(events, meter_create, (None, None), window, periods, total, summed=True)
