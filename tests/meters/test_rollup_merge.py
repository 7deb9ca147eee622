"""Rollup partials are mergeable: merging is associative and commutative with an identity,
and the merged result equals the aggregation over all the underlying values."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from meters.aggregations import Aggregation, Partial

AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)
values = st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=20)
keys = st.lists(st.sampled_from(["s:a", "s:b", "n:1.0", "b:true"]), max_size=6)


def partial(numbers: list[float], distinct: list[str]) -> Partial:
    result = Partial()
    for number in numbers:
        result.add(1, number, number, number)
    result.values |= set(distinct)
    return result


def merged(*parts: Partial) -> Partial:
    result = Partial()
    for part in parts:
        result.merge(part)
    return result


def same(a: Partial, b: Partial) -> bool:
    return (
        a.events == b.events
        and math.isclose(a.total, b.total, rel_tol=1e-9, abs_tol=1e-6)
        and a.low == b.low
        and a.high == b.high
        and a.values == b.values
    )


@given(a=values, b=values, c=values, ka=keys, kb=keys, kc=keys)
def test_merge_laws(
    a: list[float], b: list[float], c: list[float], ka: list[str], kb: list[str], kc: list[str]
) -> None:
    pa, pb, pc = partial(a, ka), partial(b, kb), partial(c, kc)
    assert same(merged(merged(pa, pb), pc), merged(pa, merged(pb, pc)))  # associative
    assert same(merged(pa, pb), merged(pb, pa))  # commutative
    assert same(merged(pa, Partial()), pa)  # identity


@given(a=values, b=values, ka=keys, kb=keys)
def test_merged_result_equals_the_aggregate_of_all_values(
    a: list[float], b: list[float], ka: list[str], kb: list[str]
) -> None:
    both = merged(partial(a, ka), partial(b, kb))
    everything = a + b
    expected = {
        "count": float(len(everything)),
        "sum": math.fsum(everything),
        "avg": math.fsum(everything) / len(everything) if everything else 0.0,
        "min": min(everything, default=0.0),
        "max": max(everything, default=0.0),
        "unique": float(len(set(ka) | set(kb))),
    }
    for func, value in expected.items():
        result = both.result(func)
        assert math.isclose(result, value, rel_tol=1e-9, abs_tol=1e-6), func
