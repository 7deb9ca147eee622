"""Groups of a dimensioned meter merged from coded parts (`metering.groups`): whatever the
parts and their own dictionaries, the merged rows are the plain fold of the rows per key (sums
in the order the rows came), sorted as the files keep them (texts by their bytes, nulls last);
and the numbers that order rows are the same whichever way they are made."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.metering import groups
from tests.strategies import examples

_TEXT = st.sampled_from(["a", "b", "B", "é", "a b", "", "__other__"])
_ROW = st.tuples(
    st.sampled_from(["m1", "m2"]),
    st.sampled_from(["ext:x", "ext:y", "id:z"]),
    st.sampled_from([0, 900_000_000, 1_800_000_000]),
    st.none() | _TEXT,
    st.none() | _TEXT,
    st.none() | _TEXT,
    st.floats(-1e6, 1e6, allow_nan=False),
)


def _coded(rows: list[tuple[Any, ...]], first_seq: int) -> groups.Coded:
    """`rows` as a part of their own: each column's distinct texts in an order of its own."""

    def codes(texts: list[str | None]) -> tuple[pa.Array[Any], np.ndarray]:
        distinct = sorted({t for t in texts if t is not None}, reverse=True)
        return pa.array(distinct, pa.string()), np.array(
            [-1 if t is None else distinct.index(t) for t in texts], np.int64
        )

    meters, meter = codes([r[0] for r in rows])
    subjects, subject = codes([r[1] for r in rows])
    values, flat = codes([r[k] for k in (3, 4, 5) for r in rows])
    v = np.array([r[6] for r in rows], np.float64)
    return groups.Coded(
        meters,
        subjects,
        values,
        meter,
        subject,
        np.array([r[2] for r in rows], np.int64),
        flat.reshape(3, len(rows)),
        np.ones(len(rows), np.int64),
        v,
        v,
        v,
        np.arange(first_seq, first_seq + len(rows), dtype=np.int64),
    )


@settings(max_examples=examples(50))
@given(parts=st.lists(st.lists(_ROW, min_size=1, max_size=12), min_size=1, max_size=4))
def test_merged_is_the_fold_per_key_sorted_as_the_files(parts: list[list[Any]]) -> None:
    coded, seq = [], 0
    for part in parts:
        coded.append(_coded(part, seq))
        seq += len(part)
    table, keys = groups.merged(coded)
    expected: dict[tuple[Any, ...], list[Any]] = {}
    seq = 0
    for part in parts:
        for row in part:
            key = (row[0], row[1], row[2], row[3], row[4], row[5])
            found = expected.setdefault(key, [0, 0.0, math.inf, -math.inf, seq])
            found[0] += 1
            found[1] += row[6]
            found[2] = min(found[2], row[6])
            found[3] = max(found[3], row[6])
            seq += 1
    got = table.to_pylist()
    shown = [
        (
            r["meter_id"],
            r["subject"],
            round(r["bucket"].timestamp() * 1e6),
            r["d0"],
            r["d1"],
            r["d2"],
        )
        for r in got
    ]

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            (1, b"") if x is None else (0, x.encode() if isinstance(x, str) else x) for x in key
        )

    assert shown == sorted(expected, key=order)
    for key, row in zip(shown, got, strict=True):
        events, total, low, high, first = expected[key]
        assert (row["events"], row["low"], row["high"], row["first"]) == (events, low, high, first)
        assert math.isclose(row["total"], total, rel_tol=1e-12, abs_tol=1e-6)
    # Each key once in `Keys`, counting up from 0 in the rows' order.
    assert list(keys.key) == sorted(keys.key) and len(set(keys.key)) == len(
        {k[:3] for k in expected}
    )


@given(ranks=st.lists(st.tuples(*(st.integers(0, 3) for _ in range(3))), min_size=1, max_size=30))
def test_both_ways_of_numbering_rows_order_them_alike(ranks: list[tuple[int, ...]]) -> None:
    """A mixed-radix number where it fits, each row's rank in lexicographic order where it
    does not (ranks up to 3 * 2^31 each): the same order, equal rows equal."""
    columns = [np.array(c, np.int64) for c in zip(*ranks, strict=True)]
    small = groups._radix(columns)
    forced = groups._radix([c * 2**31 for c in columns])  # past 62 bits: ranked
    assert np.array_equal(np.argsort(small, kind="stable"), np.argsort(forced, kind="stable"))
    assert np.array_equal(small[:, None] == small[None, :], forced[:, None] == forced[None, :])
