"""Admission: rates, byte budgets and in-flight slots, per token and per organization."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import TooManyRequests, Unavailable
from ingest.http.admission import Admission, Limits, Rate


def _admission(**changes: object) -> Admission:
    return Admission(Limits(**changes))  # type: ignore[arg-type]


def test_request_rate_per_token_and_per_organization() -> None:
    admission = _admission(
        token_rate=Rate(requests=3, events=1e9), organization_rate=Rate(requests=5, events=1e9)
    )
    for _ in range(3):
        admission.check_rate("t1", "org")
    with pytest.raises(TooManyRequests) as refused:
        admission.check_rate("t1", "org")
    assert refused.value.retry_after >= 1
    # Another token of the same organization has its own bucket, up to the organization's.
    admission.check_rate("t2", "org")
    admission.check_rate("t2", "org")
    with pytest.raises(TooManyRequests, match="organization"):
        admission.check_rate("t2", "org")
    # Another organization is untouched.
    admission.check_rate("t3", "other")
    assert admission.refused == Counter({("token_rate", "org"): 1, ("organization_rate", "org"): 1})


def test_events_are_charged_after_the_request_and_refuse_the_next_ones() -> None:
    admission = _admission(token_rate=Rate(requests=1e9, events=100))
    admission.check_rate("t", "org")
    admission.charge_events("t", "org", 250)  # one request may overdraw
    with pytest.raises(TooManyRequests) as refused:
        admission.check_rate("t", "org")
    assert refused.value.retry_after == 2  # 150 events of debt at 100 per second
    admission.check_rate("u", "other")


async def _hold_slots(admission: Admission, org: str, count: int, stack: AsyncExitStack) -> None:
    for _ in range(count):
        await stack.enter_async_context(admission.slot(org))


def test_an_organization_holds_at_most_its_share_of_slots() -> None:
    async def go() -> None:
        admission = _admission(max_inflight=8, organization_share=0.5)
        async with AsyncExitStack() as stack:
            await _hold_slots(admission, "a", 4, stack)
            with pytest.raises(TooManyRequests):
                await _hold_slots(admission, "a", 1, stack)
            await _hold_slots(admission, "b", 4, stack)
            with pytest.raises(Unavailable):
                await _hold_slots(admission, "c", 1, stack)
            assert admission.inflight == 8
        assert admission.inflight == 0

    asyncio.run(go())


operations = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(0, 40), st.booleans()), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_byte_budgets_hold_whatever_the_order(ops: list[tuple[str, int, bool]]) -> None:
    """Whatever organizations reserve and release, in any order: no organization holds more
    than its share, the total never passes the budget, and what is released is given back."""
    admission = _admission(max_buffered_bytes=100, organization_share=0.4)
    held: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for org, size, release in ops:
        if release and held[org]:
            admission.unreserve(org, held[org].pop())
            continue
        try:
            admission.reserve(org, size)
        except (TooManyRequests, Unavailable):
            continue
        held[org].append(size)
        assert all(sum(sizes) <= 40 for sizes in held.values())
        assert admission.buffered_bytes == sum(map(sum, held.values())) <= 100
    for org, sizes in held.items():
        for size in sizes:
            admission.unreserve(org, size)
    assert admission.buffered_bytes == 0
