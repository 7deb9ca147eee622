"""Credit grants' reference rules (`meters.ledger_rules`): burn order, conservation, merging,
revocation, expiry and what a reset carries."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meters.ledger_rules import (
    MAX_EXPIRY_YEARS,
    CreditCreate,
    Credits,
    Grant,
    burn,
    carry,
    credited,
    expire,
    grant,
    revoke,
)

GRANTS = st.lists(
    st.builds(
        Grant,
        units=st.integers(0, 100),
        priority=st.integers(0, 3),
        expires_at_us=st.none() | st.integers(1, 4),
        rollover=st.booleans(),
        seq=st.integers(0, 1000),
    ),
    max_size=8,
).map(
    lambda gs: [
        Grant(g.units, g.priority, g.expires_at_us, g.rollover, i) for i, g in enumerate(gs)
    ]
)
CONSUMED = st.floats(-50, 600, allow_nan=False)


def _identity(grants: list[Grant], consumed: float) -> None:
    burned = burn(grants, consumed)
    assert math.isclose(
        sum(burned.remaining) - burned.beyond, credited(grants) - consumed, abs_tol=1e-6
    )


@given(grants=GRANTS, consumed=CONSUMED)
def test_what_remains_less_what_no_grant_covers_is_the_balance(
    grants: list[Grant], consumed: float
) -> None:
    _identity(grants, consumed)
    burned = burn(grants, consumed)
    assert all(0 <= r <= g.units for r, g in zip(burned.remaining, grants, strict=True))


@given(grants=GRANTS, consumed=CONSUMED, data=st.data())
def test_the_order_given_does_not_matter(
    grants: list[Grant], consumed: float, data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(grants))))
    shuffled = [grants[i] for i in order]
    mine = burn(grants, consumed)
    theirs = burn(shuffled, consumed)
    assert [theirs.remaining[k] for k in range(len(order))] == [mine.remaining[i] for i in order]
    assert theirs.beyond == mine.beyond


@given(grants=GRANTS, consumed=CONSUMED)
def test_a_grant_burns_only_once_every_grant_before_it_is_used_up(
    grants: list[Grant], consumed: float
) -> None:
    remaining = burn(grants, consumed).remaining
    for i, a in enumerate(grants):
        for j, b in enumerate(grants):
            if a.burn_key < b.burn_key and remaining[j] < b.units:
                assert remaining[i] == 0, (a, b)


def test_priority_then_earliest_expiry_then_plain_then_granted_order() -> None:
    grants = [
        Grant(10, priority=5, seq=0),  # burns last: the greatest priority
        Grant(10, priority=1, rollover=True, seq=1),
        Grant(10, priority=1, seq=2),  # plain before rollover, all else equal
        Grant(10, priority=1, expires_at_us=50, seq=3),  # no expiry burns last
        Grant(10, priority=1, expires_at_us=20, seq=4),
    ]
    assert burn(grants, 35).remaining == (10, 5, 0, 0, 0)
    assert burn(grants, 100).beyond == 50


@given(grants=GRANTS, new=st.integers(1, 50), consumed=CONSUMED)
def test_merging_changes_no_total(grants: list[Grant], new: int, consumed: float) -> None:
    fresh = Grant(new, 1, 2, False, 10_000)
    merged = grant(grants, fresh)
    assert credited(merged) == credited(grants) + new
    assert (
        len({g.merge_key for g in merged}) == len({g.merge_key for g in grants} | {fresh.merge_key})
        or len(merged) == len(grants) + 1
    )
    _identity(merged, consumed)
    apart = [*grants, fresh]  # the same units as a grant of its own
    assert math.isclose(sum(burn(merged, consumed).remaining), sum(burn(apart, consumed).remaining))


@given(grants=GRANTS, units=st.integers(1, 300), rollover=st.booleans())
def test_revocation_clamps_as_credits_do(grants: list[Grant], units: int, rollover: bool) -> None:
    after = revoke(grants, units, rollover)
    assert credited(after) == max(0, credited(grants) - units)
    assert all(g.units > 0 for g in after)


def test_revocation_takes_its_kind_first_then_in_reverse_burn_order() -> None:
    grants = [Grant(10, 1, 5, False, 0), Grant(10, 1, None, False, 1), Grant(10, 1, None, True, 2)]
    assert [g.units for g in revoke(grants, 15, False)] == [5, 10]  # the never-expiring first
    assert [g.units for g in revoke(grants, 15, True)] == [10, 5]  # then the others
    assert [g.units for g in revoke(grants, 35, True)] == []


@given(grants=GRANTS, consumed=CONSUMED, data=st.data())
def test_an_expiry_takes_the_unused_whole_units_and_keeps_the_identity(
    grants: list[Grant], consumed: float, data: st.DataObject
) -> None:
    if not grants:
        return
    i = data.draw(st.integers(0, len(grants) - 1))
    before = burn(grants, consumed).remaining[i]
    after, taken = expire(grants, i, consumed)
    assert taken == math.floor(before)
    assert credited(after) == credited(grants) - taken
    assert burn(after, consumed).remaining[i] == 0
    _identity(after, consumed)
    # What it burned stays burned, however consumption moves after.
    later = data.draw(CONSUMED)
    _identity(after, later)


@given(
    credits=st.lists(st.tuples(st.integers(1, 50), st.booleans()), max_size=10),
    consumed=st.floats(-100, 500, allow_nan=False),
)
def test_without_priorities_or_expiries_a_reset_carries_what_polar_does(
    credits: list[tuple[int, bool]], consumed: float
) -> None:
    grants: list[Grant] = []
    sums = Credits()
    for seq, (units, rollover) in enumerate(credits):
        grants = grant(grants, Grant(units, rollover=rollover, seq=seq))
        sums = sums.add(units, rollover)
    assert credited(grants) == sums.credited
    assert sum(g.units for g in carry(grants, consumed)) == sums.carried_over(consumed)


def test_carried_grants_keep_priority_and_expiry() -> None:
    grants = [Grant(10, 3, 99, True, 0), Grant(10, 1, None, False, 1), Grant(4, 2, None, True, 2)]
    assert carry(grants, 12) == [Grant(2, 2, None, True, 0), Grant(10, 3, 99, True, 1)]


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _credit(**fields: object) -> CreditCreate:
    base = {"customer_id": uuid.uuid4(), "meter_id": uuid.uuid4(), "external_id": "k"}
    return CreditCreate.model_validate({**base, "units": 5, **fields})


def test_grant_fields_are_checked_at_the_records_time() -> None:
    assert _credit().grant_error(NOW) is None
    assert _credit(expires_at=NOW + timedelta(days=1)).grant_error(NOW) is None
    assert _credit(expires_at=NOW).grant_error(NOW) == (
        "expires_at",
        "expires_at must be in the future",
    )
    far = NOW + timedelta(days=366 * MAX_EXPIRY_YEARS)
    assert _credit(expires_at=far).grant_error(NOW)[0] == "expires_at"  # type: ignore[index]
    assert _credit(units=-1, priority=3).grant_error(NOW)[0] == "priority"  # type: ignore[index]
    revoke_expiring = _credit(units=-1, expires_at=NOW + timedelta(days=1))
    assert revoke_expiring.grant_error(NOW)[0] == "expires_at"  # type: ignore[index]
    with pytest.raises(ValidationError) as raised:
        _credit(priority=256)
    assert raised.value.errors()[0]["loc"] == ("priority",)


def test_a_credit_without_grant_fields_dumps_as_before() -> None:
    """Its idempotency digest and write record are those of earlier versions."""
    assert set(_credit().model_dump(mode="json")) == {
        "customer_id",
        "external_customer_id",
        "meter_id",
        "external_id",
        "units",
        "rollover",
    }
    assert _credit(priority=7).model_dump(mode="json")["priority"] == 7
