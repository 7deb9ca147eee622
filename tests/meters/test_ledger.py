"""The ledger's rules: Polar's documented examples, running sums clamped at zero, rollover,
and plan cycles that never drift across short months."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from meters.ledger_rules import Credits, cycle_start


def test_polar_docs_grant_10_use_3_then_8() -> None:
    credits = Credits().add(10, rollover=False)
    assert credits.credited - 3 == 7
    assert credits.credited - (3 + 8) == -1  # the balance may go negative


def test_revocation_clamps_at_zero_and_later_credits_count_in_full() -> None:
    credits = Credits().add(5, False).add(-8, False)
    assert credits.credited == 0
    assert credits.add(4, False).credited == 4


def test_only_rollover_credits_carry_over_capped_by_what_is_left() -> None:
    credits = Credits().add(100, False).add(30, True)
    assert credits.carried_over(consumed=50) == 30  # 80 left, 30 may roll over
    assert credits.carried_over(consumed=120) == 10  # 10 left
    assert credits.carried_over(consumed=200) == 0  # overdrawn
    assert Credits().add(100, False).carried_over(consumed=0) == 0


@given(
    credits=st.lists(st.tuples(st.integers(-50, 50), st.booleans()), max_size=20),
    consumed=st.floats(-100, 500, allow_nan=False),
)
def test_running_sums_are_never_negative_and_carry_is_bounded(
    credits: list[tuple[int, bool]], consumed: float
) -> None:
    state = Credits()
    for units, rollover in credits:
        state = state.add(units, rollover)
        assert min(state.credited, state.rollover, state.plain) >= 0
    assert 0 <= state.carried_over(consumed) <= state.rollover


def test_monthly_cycles_from_the_31st() -> None:
    start = datetime(2025, 1, 31, 9, 30, tzinfo=UTC)
    days = [cycle_start(start, "month", n).day for n in range(13)]
    assert days == [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31]
    leap = datetime(2024, 2, 29, tzinfo=UTC)
    assert cycle_start(leap, "year", 1) == datetime(2025, 2, 28, tzinfo=UTC)
    assert cycle_start(leap, "year", 4) == datetime(2028, 2, 29, tzinfo=UTC)


@given(
    start=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
    ),
    n=st.integers(0, 200),
)
def test_cycles_keep_the_anchor_day_and_time(start: datetime, n: int) -> None:
    moment = cycle_start(start, "month", n)
    assert (moment.year * 12 + moment.month) - (start.year * 12 + start.month) == n
    assert moment.day == min(start.day, calendar.monthrange(moment.year, moment.month)[1])
    assert moment.time() == start.time()
    assert cycle_start(start, "month", n + 1) > moment
