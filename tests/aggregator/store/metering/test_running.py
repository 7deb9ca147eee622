"""The running-value kernel that alerts and top-ups share: its arrays are the plain fold of
`Partial`, event by event, customer by customer."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from aggregator.store.engine.catalog import CustomerKey
from aggregator.store.metering import running
from meters.aggregations import Partial

FUNCS = ("count", "sum", "avg", "min", "max", "latest")
NUMBERS = st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: round(x, 3))

# Subjects: two references of customer a, one of b, one of nobody.
NAMED = {
    "id:a": CustomerKey("a", "org", "ext-a"),
    "ext:ext-a": CustomerKey("a", "org", "ext-a"),
    "id:b": CustomerKey("b", "org", None),
}
SUBJECTS = [*NAMED, "ext:nobody"]


def _before(events: list[tuple[float, int]]) -> Partial:
    usage = Partial()
    for value, at in events:
        usage.add_event(value)
        usage.add_point(at, value)
    return usage


@given(
    st.sampled_from(FUNCS),
    st.lists(st.tuples(NUMBERS, st.integers(0, 50)), max_size=5),
    st.lists(st.tuples(NUMBERS, st.integers(0, 50)), min_size=1, max_size=30),
)
def test_running_is_the_fold_of_each_prefix(
    func: str, before: list[tuple[float, int]], batch: list[tuple[float, int]]
) -> None:
    c = np.array([v for v, _ in batch], np.float64)
    times = np.array([t for _, t in batch], np.int64)
    values, events, after = running.running(func, _before(before), c, times)
    fold = _before(before)
    for i, (value, at) in enumerate(batch):
        fold.add_event(value)
        fold.add_point(at, value)
        # Sums folded in another order: equal up to rounding.
        assert math.isclose(values[i], fold.result(func), rel_tol=1e-9, abs_tol=1e-6)
        assert events[i] == fold.events
    assert math.isclose(after.result(func), fold.result(func), rel_tol=1e-9, abs_tol=1e-6)


@given(st.lists(st.text("xyz", max_size=1), max_size=5), st.lists(st.text("xyz", max_size=1)))
def test_running_unique_counts_distinct_values(before: list[str], keys: list[str]) -> None:
    usage = Partial(events=len(before), values=set(before))
    values, places, after = running.running_unique(usage, keys)
    assert places.tolist() == [len({*before, *keys[: i + 1]}) for i in range(len(keys))]
    assert values.tolist() == places.tolist()
    assert after.values == {*before, *keys}


@given(
    st.lists(st.tuples(st.sampled_from(SUBJECTS), NUMBERS), max_size=40),
    st.randoms(use_true_random=False),
    st.sampled_from([None, {"a"}, {"b"}, {"a", "b"}, set()]),
)
def test_rows_grouped_by_customer_in_seq_order(
    rows: list[tuple[str, float]], shuffle: object, only: set[str] | None
) -> None:
    """Rows of one customer's references go to it in seq order, whatever order they come in;
    rows of no customer (or one not kept) go nowhere; a running sum starts again per customer."""
    seqs = list(range(len(rows)))
    shuffle.shuffle(seqs)  # type: ignore[attr-defined]
    subject = pa.array([rows[s][0] for s in seqs], pa.string())
    grouped = running.by_customer(subject, np.array(seqs, np.int64), NAMED, only)
    expected = {
        key.id: [s for s in range(len(rows)) if NAMED.get(rows[s][0]) == key]
        for key in sorted(set(NAMED.values()))
        if (only is None or key.id in only) and any(NAMED.get(r[0]) == key for r in rows)
    }
    assert [c.id for c in grouped.customers] == list(expected)
    assert len(grouped.starts) == len(grouped.ends) == len(grouped.customers)
    by_row = np.array(seqs, np.int64)
    for k, customer in enumerate(grouped.customers):
        assert by_row[grouped.rows(k)].tolist() == expected[customer.id]
    values = np.array([rows[s][1] for s in by_row[grouped.order].tolist()], np.float64)
    sums = grouped.cumsum(values)
    for k, customer in enumerate(grouped.customers):
        mine = [rows[s][1] for s in expected[customer.id]]
        part = sums[grouped.starts[k] : grouped.ends[k]]
        assert np.allclose(part, np.cumsum(mine)), customer
