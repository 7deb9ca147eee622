"""The ledger's usage of a batch is the same whichever way it is aggregated: over the batch's
rows (a few meters, `rollups.WIDE_METERS`) or over the contributions as rows (many); a latest
meter's point is each subject's greatest (instant, value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from unittest import mock

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.machinery import rollups
from meters.aggregations import PropertyAggregation
from tests.strategies import examples

SUM = PropertyAggregation(func="sum", property="v")
LATEST = PropertyAggregation(func="latest", property="v")


@dataclass(frozen=True)
class _Meter:
    id: str
    aggregation: Any = SUM


CONTRIBUTION = st.one_of(st.none(), st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.25, 1e20, 7.0]))


@st.composite
def batches(draw: st.DrawFn) -> tuple[pa.Table, list[tuple[int, Any]]]:
    meters = draw(st.integers(1, 5))
    rows = draw(st.integers(0, 30))
    columns: dict[str, Any] = {
        "subject": pa.array(
            [draw(st.sampled_from(["ext:a", "ext:b", "id:c"])) for _ in range(rows)], pa.string()
        ),
        "bucket": pa.array([0] * rows, pa.timestamp("us", tz="UTC")),
        "seq": pa.array(range(rows), pa.int64()),
        "at_us": pa.array([draw(st.integers(0, 3)) for _ in range(rows)], pa.int64()),
    }
    for i in range(meters):
        columns[f"v{i}"] = pa.array([draw(CONTRIBUTION) for _ in range(rows)], pa.float64())
    return pa.table(columns), [(i, _Meter(f"m{i}")) for i in range(meters)]


def _sorted(table: pa.Table) -> list[tuple[Any, ...]]:
    return sorted(tuple(row.values()) for row in table.to_pylist())


@settings(max_examples=examples(200), deadline=None)
@given(batches())
def test_usage_over_rows_equals_usage_over_contributions(
    batch: tuple[pa.Table, list[tuple[int, Any]]],
) -> None:
    values, numbers = batch
    wide, _, _ = rollups._live_ledger(values, numbers, [], [])
    with mock.patch.object(rollups, "WIDE_METERS", 0):
        long, _, _ = rollups._live_ledger(values, numbers, [], [])
    assert wide.schema == long.schema
    assert _sorted(wide) == _sorted(long)


@settings(max_examples=examples(200), deadline=None)
@given(batches())
def test_latest_points_are_each_subjects_greatest(
    batch: tuple[pa.Table, list[tuple[int, Any]]],
) -> None:
    values, numbers = batch
    meters = [(i, _Meter(m.id, LATEST)) for i, m in numbers]
    _, _, points = rollups._live_ledger(values, [], [], meters)
    expected: dict[tuple[str, str], tuple[int, float]] = {}
    rows = values.to_pylist()
    for i, meter in meters:
        for row in rows:
            if row[f"v{i}"] is not None:
                key, point = (meter.id, row["subject"]), (row["at_us"], row[f"v{i}"])
                expected[key] = max(expected.get(key, point), point)
    got = {(r["meter_id"], r["subject"]): (r["at_us"], r["value"]) for r in points.to_pylist()}
    assert got == expected
