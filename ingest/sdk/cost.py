"""`_cost` from what a cost function returns: an amount in cents, made valid for Polar and
meterline (Decimal(17, 12): at most 5 digits before the point and 12 after, currency `usd`)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from ingest.sdk.errors import InvalidCost
from meters.errors import FieldError
from meters.events import parse_cost_amount

CostValue = int | float | Decimal | str | Mapping[str, Any]
_PLACES = Decimal(1).scaleb(-12)


def cost_metadata(value: CostValue) -> dict[str, str]:
    """`{"amount": "<canonical decimal>", "currency": "usd"}`: the amount rounded (half even)
    to 12 decimal places, so float arithmetic (`tokens * 0.00015`) is fine.

    Raises:
        InvalidCost: not a finite number, ≥ 100,000 cents (Polar's limit per event), or a
            currency other than usd.
    """
    amount: Any = value
    if isinstance(value, Mapping):
        if value.get("currency", "usd") != "usd":
            raise InvalidCost(f"currency {value.get('currency')!r}: only 'usd' is supported")
        amount = value.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float | Decimal | str):
        raise InvalidCost(f"a cost is a number of cents, not {type(amount).__name__}")
    try:
        # repr(): the float's shortest round-tripping text, not its binary expansion.
        number = Decimal(repr(amount)) if isinstance(amount, float) else Decimal(amount)
        rounded = number.quantize(_PLACES, rounding=ROUND_HALF_EVEN)
    except (InvalidOperation, ValueError):
        raise InvalidCost(f"cost {amount!r} is not a valid amount of cents") from None
    errors: list[FieldError] = []
    canonical = parse_cost_amount(format(rounded, "f"), ("_cost", "amount"), errors)
    if canonical is None:
        raise InvalidCost(f"cost {amount!r}: {errors[0].msg if errors else 'invalid'}")
    return {"amount": canonical, "currency": "usd"}
