"""The ledger's usage of a batch is the same whichever way it is aggregated: over the batch's
rows (a few meters, `rollups.WIDE_METERS`) or over the contributions as rows (many); a latest
meter's point is each subject's greatest (instant, value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.base.arrays import numpy
from aggregator.store.metering import rollups
from aggregator.store.metering.meter_plan import Contributions
from meters.aggregations import PropertyAggregation
from meters.filters import Filter
from tests.strategies import examples

SUM = PropertyAggregation(func="sum", property="v")
LATEST = PropertyAggregation(func="latest", property="v")
EVERY_EVENT = Filter(conjunction="and", clauses=[])


@dataclass(frozen=True)
class _Meter:
    id: str
    aggregation: Any = SUM
    version: int = 1
    filter: Filter = EVERY_EVENT
    dimensions: tuple[str, ...] = ()


def _contributions(values: pa.Table, meters: int) -> Contributions:
    """The contributions of columns v0 .. vN of `values`, each its own meter's."""
    n = values.num_rows
    columns = [values.column(f"v{i}") for i in range(meters)]
    return Contributions(
        np.ones((1, n), np.bool_),
        np.array([numpy(pc.is_valid(c), np.bool_) for c in columns]).reshape(meters, n),
        np.array([numpy(c, np.float64) for c in columns]).reshape(meters, n),
        tuple(pa.nulls(n, pa.string()) for _ in columns),
        np.zeros(meters, np.intp),
        np.arange(meters, dtype=np.intp),
        (False,) * meters,
    )


def _ledger(values: pa.Table, meters: list[tuple[int, Any]]) -> tuple[pa.Table, ...]:
    keys = values.select(["subject", "bucket", "seq", "at_us"])
    return rollups._live_ledger(keys, _contributions(values, len(meters)), [m for _, m in meters])


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
    wide, _, _ = _ledger(values, numbers)
    with mock.patch.object(rollups, "WIDE_METERS", 0):
        long, _, _ = _ledger(values, numbers)
    assert wide.schema == long.schema
    assert _sorted(wide) == _sorted(long)


@settings(max_examples=examples(200), deadline=None)
@given(batches())
def test_latest_points_are_each_subjects_greatest(
    batch: tuple[pa.Table, list[tuple[int, Any]]],
) -> None:
    values, numbers = batch
    # Another version: what meters are is cached per (id, version).
    meters = [(i, _Meter(m.id, LATEST, version=2)) for i, m in numbers]
    _, _, points = _ledger(values, meters)
    expected: dict[tuple[str, str], tuple[int, float]] = {}
    rows = values.to_pylist()
    for i, meter in meters:
        for row in rows:
            if row[f"v{i}"] is not None:
                key, point = (meter.id, row["subject"]), (row["at_us"], row[f"v{i}"])
                expected[key] = max(expected.get(key, point), point)
    got = {(r["meter_id"], r["subject"]): (r["at_us"], r["value"]) for r in points.to_pylist()}
    assert got == expected
