"""Quantities split by a meter's dimensions (`Scope.group_by`) equal the reference fold over each
group's raw events, in any timezone and interval, and the groups together make the ungrouped
quantity: their sum for count and sum meters, their least for min, their greatest for max. With
a bound on a dimension's values per customer and bucket, the values past the first ones to come
count under `OTHER`, whether read from the rollups or from the events; and the meter is listed
as folded exactly when one did."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.settings import DIMENSION_VALUES
from aggregator.store import MeterRow, Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.metering.groups import folds
from aggregator.store.metering.rollups import BUCKET_US
from aggregator.store.tables.correction_jobs import amend_job
from aggregator.store.tables.dimensions import OTHER, breakdown, group_of
from aggregator.store.tables.meter_tables import create_job
from aggregator.store.tables.quantities import Gathered, Scope, gather
from meters.aggregations import Partial, fold
from meters.corrections import Amendment
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.periods import boundaries
from meters.times import EPOCH
from tests.aggregator.store.tables.test_quantities import (
    _ONE_US,
    ORG,
    ZONES,
    _to_us,
    _view,
    event_lists,
    moments,
)
from tests.strategies import examples

NUMBER_METERS = [
    {"func": "count"},
    *({"func": f, "property": "v"} for f in ("sum", "avg", "min", "max")),
]


def _text(value: Any) -> str | None:
    """A metadata value as a dimension reads it (JSON's text of it; a string itself)."""
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


@settings(
    max_examples=examples(15),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=event_lists(),
    aggregation=st.sampled_from(NUMBER_METERS),
    group_by=st.sampled_from([("tag",), ("v",), ("tag", "v"), ("v", "tag")]),
    start=moments,
    length=st.integers(0, 6 * 86_400 * 10**6),
    interval=st.sampled_from(["hour", "day", "week", "month"]),
    zone=st.sampled_from(ZONES),
    customer=st.sampled_from([None, "c1"]),
    tag=st.sampled_from([None, "p"]),
    restrict=st.sampled_from(["metadata", "dimension"]),
    bound=st.sampled_from([None, 1, 2]),
)
def test_each_group_equals_the_fold_over_its_events(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[Event],
    aggregation: dict[str, Any],
    group_by: tuple[str, ...],
    start: int,
    length: int,
    interval: str,
    zone: str,
    customer: str | None,
    tag: str | None,
    restrict: str,
    bound: int | None,
) -> None:
    """Scoped to a customer, and to a value of the metadata (read from the events) or of a
    dimension (`dimension[tag]=p`, from the rollups), or not."""
    end = start + min(length, 7 * 86_400 * 10**6 if interval == "hour" else length)
    meter_create = MeterCreate.model_validate(
        {
            "name": "meter",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": aggregation,
            "dimensions": list(DIMENSIONS),
        }
    )

    async def run() -> tuple[MeterRow, Gathered, bool, dict[str, Partial]]:
        path = tmp_path_factory.mktemp("g") / "m.duckdb"
        async with Store(path, dimension_values=bound or DIMENSION_VALUES) as store:
            meter = await store.write(create_job(ORG, meter_create, 0, meter_id=str(uuid.uuid4())))
            for first in range(0, len(events), 7):
                chunk = events[first : first + 7]
                await store.write(IngestJob(ORG, to_table(chunk), 0))
            asked = () if tag is None else (("tag", (tag,)),)
            scope = Scope(
                meter,
                None if customer is None else (f"ext:{customer}",),
                asked if restrict == "metadata" else (),
                group_by=group_by,
                dimensions=asked if restrict == "dimension" else (),
            )
            found = await store.read(gather, scope, start, end, interval, ZoneInfo(zone), 0)
            # A customer meter's breakdown: the same groups, of all the customer's events.
            split = await store.read(breakdown, meter, ("ext:c1",), group_by)
            return meter, found, await store.read(folds, meter.id), split

    meter, gathered, folded_meter, split = asyncio.run(run())
    func = str(aggregation["func"])

    def counts(e: Event) -> bool:
        return func == "count" or meter_create.aggregation.contribution(_view(e)) is not None

    grouped = _bounded(events, counts, bound)
    # Listed as folded exactly when a value counted under `OTHER`: only then are values read
    # from the events looked up in their bucket's groups.
    assert folded_meter == any(OTHER in values for values in grouped)
    matching = [
        e
        for i, e in enumerate(events)
        if customer in (None, e.external_customer_id)
        and tag
        in (
            None,
            e.metadata.get("tag") if restrict == "metadata" else grouped[i][0],
        )
    ]
    edges = boundaries(EPOCH + start * _ONE_US, EPOCH + end * _ONE_US, interval, ZoneInfo(zone))
    spans = [(_to_us(edges[i]), _to_us(edges[i + 1])) for i in range(len(edges) - 1)]

    def expect(chosen: list[Event], lo: int, hi: int) -> float:
        return fold(
            meter_create.aggregation, [_view(e) for e in chosen if lo <= e.timestamp_us < hi]
        )

    index = {id(e): i for i, e in enumerate(events)}

    def values(e: Event) -> list[str | None]:
        return [grouped[index[id(e)]][DIMENSIONS.index(k)] for k in group_by]

    periods, total = gathered.reduced(meter, None)
    groups, folded = gathered.groups(meter)
    assert folded == 0
    # A group for each values of an event the meter counts in the periods, once.
    lo, hi = _to_us(edges[0]), _to_us(edges[-1])
    counted = [e for e in matching if lo <= e.timestamp_us < hi and counts(e)]
    found = [tuple(group_of(key, len(group_by))) for key, _, _ in groups]
    assert sorted(found, key=json.dumps) == sorted(
        {tuple(values(e)) for e in counted}, key=json.dumps
    )
    for key, group_periods, group_total in groups:
        mine = [e for e in matching if values(e) == group_of(key, len(group_by))]
        assert [p for p, _ in group_periods] == edges[:-1]
        for (lo, hi), (_, quantity) in zip(spans, group_periods, strict=True):
            _close(quantity, expect(mine, lo, hi), (key, lo))
        _close(group_total, expect(mine, start, end + 1), (key, "total"))
    # The ungrouped figures, from the same partials, are the reference's over all events ...
    for (lo, hi), (_, quantity) in zip(spans, periods, strict=True):
        _close(quantity, expect(matching, lo, hi), ("all", lo))
    _close(total, expect(matching, start, end + 1), ("all", "total"))
    # ... and the groups' combined: those with events in the window (a group of events in the
    # periods alone has a window total of nothing, 0, which no minimum takes).
    theirs = [e for e in events if e.external_customer_id == "c1" and counts(e)]
    assert sorted(json.dumps(group_of(k, len(group_by))) for k in split) == sorted(
        {json.dumps(values(e)) for e in theirs}
    )
    for key, partial in split.items():
        mine = [e for e in theirs if values(e) == group_of(key, len(group_by))]
        _close(partial.result(func), expect(mine, -(2**62), 2**62), (key, "breakdown"))
    combine = {"count": math.fsum, "sum": math.fsum, "min": min, "max": max}.get(func)
    inside = [
        t
        for key, _, t in groups
        if any(
            values(e) == group_of(key, len(group_by)) and start <= e.timestamp_us <= end
            for e in counted
        )
    ]
    if combine is not None and inside:
        _close(total, combine(inside), ("combined", func))


DIMENSIONS = ("tag", "v")


def _bounded(
    events: list[Event], counts: Callable[[Event], bool], bound: int | None
) -> list[list[str | None]]:
    """Each event's values of `DIMENSIONS` as the meter's groups count them: per customer
    reference, 15-minute bucket and dimension, the first `bound` values to come (in seq order,
    among the events the meter counts) keep theirs, the others count under `OTHER`."""
    kept: dict[tuple[Any, ...], list[str]] = {}
    found = []
    for e in events:
        values = [_text(e.metadata.get(k)) for k in DIMENSIONS]
        if bound is not None and counts(e):
            subject = e.customer_id or f"ext:{e.external_customer_id}"
            for k, value in enumerate(values):
                if value is None:
                    continue
                mine = kept.setdefault((subject, e.timestamp_us // BUCKET_US, k), [])
                if value not in mine:
                    if len(mine) < bound:
                        mine.append(value)
                    else:
                        values[k] = OTHER
        found.append(values)
    return found


def _close(got: float, expected: float, where: object) -> None:
    assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-6), (where, got, expected)


@given(
    totals=st.lists(st.integers(-50, 50), min_size=1, max_size=12),
    limit=st.integers(1, 12),
    func=st.sampled_from(["count", "sum", "max"]),
)
def test_past_the_limit_the_least_groups_fold_into_other(
    totals: list[int], limit: int, func: str
) -> None:
    """The `limit` groups of the greatest window totals (in absolute value) are kept, the rest
    folded into `OTHER`, after them: for a count or a sum, the groups' totals still add up to
    the ungrouped total, and each period's quantities too."""
    day = datetime(2026, 3, 1, tzinfo=UTC)
    periods = [day, day + timedelta(days=1), day + timedelta(days=2)]
    partials = {}
    for g, value in enumerate(totals):
        key = json.dumps([f"g{g:02d}"])
        partials[(0, key)] = Partial(1, float(value), float(value), float(value))
        partials[(1, key)] = Partial(1, 1.0, 1.0, 1.0)
    whole = {(0, k): Partial() for _, k in partials}
    for (_, k), p in partials.items():
        whole[(0, k)].merge(p)
    meter: Any = SimpleNamespace(aggregation=_aggregation(func))  # what reducing reads
    gathered = Gathered(periods, partials, whole)
    groups, folded = gathered.groups(meter, limit)
    assert folded == max(0, len(totals) - limit)
    kept = [k for k, _, _ in groups if k != OTHER]
    assert len(kept) == min(limit, len(totals)) and kept == sorted(kept)
    size = {
        json.dumps([f"g{g:02d}"]): abs(v + 1.0 if func == "sum" else 0)
        for g, v in enumerate(totals)
    }
    if func == "sum" and folded:
        assert min(size[k] for k in kept) >= max(size[k] for k in size if k not in kept)
    assert (groups[-1][0] == OTHER) == bool(folded)
    if func in ("count", "sum"):
        (periods_all, total_all) = gathered.reduced(meter, None)
        _close(math.fsum(t for _, _, t in groups), total_all, "total")
        for i, (_, quantity) in enumerate(periods_all):
            _close(math.fsum(g[1][i][1] for g in groups), quantity, i)


def _aggregation(func: str) -> Any:
    definition = {"func": func} if func == "count" else {"func": func, "property": "v"}
    return MeterCreate.model_validate(
        {
            "name": "meter",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": definition,
        }
    ).aggregation


_COUNT_BY_TAG = MeterCreate.model_validate(
    {
        "name": "meter",
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "count"},
        "dimensions": ["tag"],
    }
)


async def _one_value_kept(store: Store, tags: list[tuple[int, str]]) -> MeterRow:
    """A count meter by `tag` in `store` (which keeps one value per customer and bucket), then
    c1's events `e0`, `e1`, … at each (instant, tag) of `tags`."""
    meter = await store.write(create_job(ORG, _COUNT_BY_TAG, 0, meter_id=str(uuid.uuid4())))
    events = [
        Event(
            name="a",
            timestamp_us=at,
            customer_id=None,
            external_customer_id="c1",
            external_id=f"e{i}",
            parent_id=None,
            external_member_id=None,
            metadata={"tag": tag},
            cost_amount=None,
        )
        for i, (at, tag) in enumerate(tags)
    ]
    await store.write(IngestJob(ORG, to_table(events), 0))
    return meter


def test_values_past_the_bound_count_under_other_in_a_breakdown_and_at_the_edges(
    tmp_path: Path,
) -> None:
    """With one value kept per customer and bucket: of c1's tags a, b, c in one bucket, b and c
    count under `OTHER`; its b of the next bucket keeps its name. A customer meter's breakdown
    (its events) and the quantities of a window cutting both buckets (whole buckets from the
    groups, its edges from the events) say the same."""
    first = 40 * BUCKET_US
    tags = [(first, "a"), (first + 1, "b"), (first + 2, "c"), (first + BUCKET_US + 1, "b")]

    async def run() -> tuple[dict[str, Partial], list[tuple[str, list[Any], float]], bool]:
        async with Store(tmp_path / "m.duckdb", dimension_values=1) as store:
            meter = await _one_value_kept(store, tags)
            split = await store.read(breakdown, meter, ("ext:c1",), ("tag",))
            scope = Scope(meter, ("ext:c1",), group_by=("tag",))
            window = (first + 1, first + 2 * BUCKET_US - 1)  # cuts both buckets
            found = await store.read(gather, scope, *window, "day", ZoneInfo("UTC"), 0)
            groups, _ = found.groups(meter)
            return split, groups, await store.read(folds, meter.id)

    split, groups, listed = asyncio.run(run())
    assert listed
    want = {"a": 1.0, OTHER: 2.0, "b": 1.0}
    assert {group_of(k, 1)[0]: p.result("count") for k, p in split.items()} == want
    # The window leaves out the first event (a: in its day's period only), and holds b and c
    # under OTHER, at its first edge, and b in the next bucket, at its last.
    assert {group_of(k, 1)[0]: total for k, _, total in groups} == {"a": 0.0, OTHER: 2.0, "b": 1.0}


def test_an_amendment_past_the_bound_counts_under_other_wherever_read(tmp_path: Path) -> None:
    """With one value kept per customer and bucket, c1's two events tagged a are both kept; an
    amendment tagging the second b folds it under `OTHER` (its bucket's groups evaluated again):
    the meter is listed, and a window read from the groups and one cutting the bucket (read
    from the events) say the same."""
    bucket = 40 * BUCKET_US

    async def run() -> tuple[bool, list[dict[str | None, float]], bool]:
        async with Store(tmp_path / "m.duckdb", dimension_values=1) as store:
            meter = await _one_value_kept(store, [(bucket, "a"), (bucket + 1, "a")])
            before = await store.read(folds, meter.id)
            [(second,)] = await store.read(
                lambda con: con.execute(
                    "SELECT id::VARCHAR FROM events WHERE external_id = 'e1'"
                ).fetchall()
            )
            amendment = Amendment({"metadata": {"tag": "b"}}, "retagged")
            await store.write(amend_job(ORG, second, amendment, None, 1, "amend-1"))
            scope = Scope(meter, ("ext:c1",), group_by=("tag",))
            answers = []
            for window in ((bucket, bucket + BUCKET_US - 1), (bucket, bucket + 10)):
                found = await store.read(gather, scope, *window, "day", ZoneInfo("UTC"), 0)
                groups, _ = found.groups(meter)
                answers.append({group_of(k, 1)[0]: total for k, _, total in groups})
            return before, answers, await store.read(folds, meter.id)

    before, answers, after = asyncio.run(run())
    assert not before and after
    assert answers == [{"a": 1.0, OTHER: 1.0}] * 2
