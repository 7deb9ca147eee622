"""The cost hook's `_cost`: whatever number a cost function returns becomes an amount the ingest
rules accept (≤ 12 decimal places, < 100,000 cents, `usd`), or InvalidCost."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ingest.sdk
import ingest.sdk.strategies
from ingest.sdk import InvalidCost
from ingest.sdk.cost import cost_metadata
from meters.events import EventRules, parse_ingest_body
from tests.strategies import NOW_US

LIMIT = Decimal(100_000)


def _accepted(cost: dict[str, str]) -> str | None:
    body = {"events": [{"name": "x", "external_customer_id": "c", "metadata": {"_cost": cost}}]}
    [event] = parse_ingest_body(body, now=NOW_US, rules=EventRules())
    return event.cost_amount


@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.decimals(allow_nan=False)))
def test_any_amount_is_valid_or_refused(amount: float | Decimal):
    exact = Decimal(repr(amount)) if isinstance(amount, float) else amount
    rounded = exact.quantize(Decimal("1e-12"), ROUND_HALF_EVEN) if abs(exact) < LIMIT else exact
    if abs(exact) >= LIMIT or abs(rounded) >= LIMIT:
        with pytest.raises(InvalidCost):
            cost_metadata(amount)
        return
    cost = cost_metadata(amount)
    assert cost["currency"] == "usd"
    assert Decimal(cost["amount"]) == rounded
    assert _accepted(cost) == cost["amount"]  # already canonical


def test_amounts_in_other_shapes():
    assert cost_metadata({"amount": "12.50", "currency": "usd"}) == {
        "amount": "12.5",
        "currency": "usd",
    }
    assert cost_metadata(812 * 0.000015 + 194 * 0.00006)["amount"] == "0.02382"
    for bad in (True, None, "abc", {"amount": 1, "currency": "USD"}, float("nan"), 10**5):
        with pytest.raises(InvalidCost):
            cost_metadata(bad)  # type: ignore[arg-type]


def test_the_public_api_is_pinned():
    assert sorted(ingest.sdk.__all__) == ingest.sdk.__all__
    public = {
        name
        for name, value in vars(ingest.sdk).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(ingest.sdk.__all__)
    assert ingest.sdk.strategies.__all__ == [
        "BaseStrategy",
        "DeltaTimeStrategy",
        "LLMStrategy",
        "PydanticAIStrategy",
        "S3Strategy",
        "StreamStrategy",
    ]
