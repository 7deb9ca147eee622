"""Admission: rates, byte budgets and in-flight slots, per token and per organization."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from contextlib import AsyncExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import TooManyRequests, Unavailable
from ingest.http import Front
from ingest.http.admission import Admission
from ingest.settings import Limits, Rate
from tests.strategies import examples


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


@settings(max_examples=examples(200), deadline=None)
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


def test_a_refusal_judged_from_headers_takes_nothing() -> None:
    """`refusal` refuses what `check_rate` would, and leaves the buckets as they were."""
    admission = _admission(token_rate=Rate(requests=2, events=1e9))
    for _ in range(5):
        assert admission.refusal("t", "org", None) is None
    admission.check_rate("t", "org")
    admission.check_rate("t", "org")
    refused = admission.refusal("t", "org", None)
    assert isinstance(refused, TooManyRequests) and "token" in str(refused)
    assert admission.refusal("u", "org", None) is None  # another token: its own bucket


def test_a_refusal_counts_the_organizations_shares() -> None:
    async def go() -> None:
        admission = _admission(max_inflight=8, organization_share=0.5, max_buffered_bytes=1000)
        assert admission.refusal("t", "a", 600) is not None  # past a's 500 bytes
        assert admission.refusal("t", "a", 400) is None
        async with AsyncExitStack() as stack:
            await _hold_slots(admission, "a", 4, stack)
            assert isinstance(admission.refusal("t", "a", None), TooManyRequests)
            await _hold_slots(admission, "b", 4, stack)
            assert isinstance(admission.refusal("t", "c", None), Unavailable)
        assert admission.refusal("t", "a", None) is None

    asyncio.run(go())


def test_the_gate_answers_an_ingest_request_over_its_share_and_lets_the_rest_through() -> None:
    front = Front.of(Limits(token_rate=Rate(requests=1, events=1e9)))
    gate = front.gate({"good": "org"}.get)
    headers = [(b"authorization", b"Bearer good"), (b"content-length", b"10")]
    front.admission.check_rate("good", "org")  # the one request a second, taken
    answer = gate(b"POST", b"/v1/events/ingest", headers)
    assert answer is not None
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nconnection: close" in head and b"\r\nretry-after: 1" in head
    assert json.loads(body)["error"] == "TooManyRequests"
    assert front.responses[429] == 1
    assert gate(b"POST", b"/api/v1/events", headers) is not None  # OpenMeter's path too
    # Other routes, other methods, a missing or unknown token: the application answers.
    assert gate(b"GET", b"/v1/events/ingest", headers) is None
    assert gate(b"POST", b"/v1/meters/", headers) is None
    assert gate(b"POST", b"/v1/events/ingest", [(b"content-length", b"10")]) is None
    assert gate(b"POST", b"/v1/events/ingest", [(b"authorization", b"Bearer bad")]) is None
