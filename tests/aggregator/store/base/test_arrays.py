"""The sorted runs the in-memory state keeps its sets in, against Python's own sets: any order
of adds, range drops and merges (`compact`) reads the same keys."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from aggregator.store.base.arrays import Keys, distinct, merged

keys = st.lists(st.integers(0, 60), max_size=12)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), keys),
        st.tuples(st.just("drop"), st.integers(0, 60), st.integers(0, 20)),
        st.tuples(st.just("compact")),
    ),
    max_size=30,
)


@given(steps=steps, low=st.integers(0, 60), width=st.integers(0, 61))
def test_keys_hold_what_a_set_holds(steps: list[tuple[object, ...]], low: int, width: int) -> None:
    held = Keys()
    model: set[int] = set()
    for step in steps:
        if step[0] == "add":
            added = step[1]
            assert isinstance(added, list)
            held.add(np.array(added, dtype=np.int64))
            model |= set(added)
        elif step[0] == "drop":
            start, span = step[1], step[2]
            assert isinstance(start, int) and isinstance(span, int)
            held.drop(start, start + span)
            model -= set(range(start, start + span))
        else:
            held.compact()
        assert held.between(0, 61).tolist() == sorted(model)
    assert held.between(low, low + width).tolist() == sorted(
        k for k in model if low <= k < low + width
    )


@given(a=st.lists(st.integers(0, 9)), b=st.lists(st.integers(0, 9)))
def test_merged_runs_are_sorted_and_keep_their_payload(a: list[int], b: list[int]) -> None:
    run_a = (np.array(sorted(a), np.int64), np.array(sorted(a), np.int64) * 10)
    run_b = (np.array(sorted(b), np.int64), np.array(sorted(b), np.int64) * 10)
    keys_out, payload = merged(run_a, run_b)
    assert keys_out.tolist() == sorted(a + b)
    assert (payload == keys_out * 10).all()


@given(st.lists(st.integers(-(2**62), 2**62), max_size=50))
def test_distinct_is_numpys_unique(values: list[int]) -> None:
    keys = np.array(values, np.int64)
    found = distinct(keys)
    assert found.dtype == np.int64
    assert found.tolist() == np.unique(keys).tolist()
