"""The rules of the two structured metadata values: `_cost` (an exact amount in cents) and
`_llm` (a model call's token counts)."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any

from meters.errors import FieldError, Loc
from meters.events.checks import MISSING, err, extras, is_dict, string
from meters.events.schema import NUMBER_LIMIT

COST_FIELDS = frozenset({"amount", "currency"})
LLM_TOKENS = ("input_tokens", "output_tokens", "total_tokens")
LLM_FIELDS = frozenset(
    {"vendor", "model", "prompt", "response", "cached_input_tokens", *LLM_TOKENS}
)
LLM_STRING_LENGTH = 500  # vendor and model
# `_cost.amount` fits DECIMAL(17, 12): cents, at most 5 whole digits and 12 decimal places.
COST_PLACES = 12
COST_WHOLE_DIGITS = 5


def cost(value: Any, loc: Loc, errors: list[FieldError]) -> dict[str, str] | None:
    if not is_dict(value, loc, errors):
        return None
    before = len(errors)
    extras(value, COST_FIELDS, loc, errors)
    amount = parse_cost_amount(value.get("amount", MISSING), (*loc, "amount"), errors)
    currency = value.get("currency", MISSING)
    if currency is MISSING:
        errors.append(err("missing", (*loc, "currency"), "Field required", None))
    elif type(currency) is not str:
        errors.append(
            err("string_type", (*loc, "currency"), "Input should be a valid string", currency)
        )
    elif currency != "usd":
        # Polar's type; Polar matches the pattern anywhere in the text, meterline the whole text.
        errors.append(
            err(
                "string_pattern_mismatch",
                (*loc, "currency"),
                "String should match pattern 'usd' (exactly 'usd', lowercase)",
                currency,
            )
        )
    if len(errors) != before or amount is None:
        return None
    return {"amount": amount, "currency": "usd"}


def parse_cost_amount(value: Any, loc: Loc, errors: list[FieldError]) -> str | None:
    """Parse a `_cost.amount` (cents) into its canonical decimal string: Decimal(17, 12)."""
    if value is MISSING:
        errors.append(err("missing", loc, "Field required", None))
        return None
    kind = type(value)
    try:
        if kind is int:
            number = Decimal(value)
        elif kind is float:
            # repr() is the shortest text that round-trips: what the client most likely wrote.
            number = Decimal(repr(value))
        elif kind is str:
            number = Decimal(value.strip())
        else:
            errors.append(
                err("decimal_type", loc, "Decimal input should be a number or a string", value)
            )
            return None
    except InvalidOperation:
        errors.append(err("decimal_parsing", loc, "Input should be a valid decimal", value))
        return None
    if not number.is_finite():
        errors.append(err("finite_number", loc, "Input should be a finite number", value))
        return None
    # Count places on the exact digits: normalize() would round to the context's precision
    # (28 digits) and overflow on huge exponents.
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    kept = list(digits)
    while len(kept) > 1 and kept[-1] == 0 and exponent < 0:
        kept.pop()
        exponent += 1
    if not any(kept):
        return "0"
    if -exponent > COST_PLACES:
        errors.append(
            err(
                "decimal_max_places",
                loc,
                f"Decimal input should have no more than {COST_PLACES} decimal places",
                value,
            )
        )
        return None
    if len(kept) + exponent > COST_WHOLE_DIGITS:
        errors.append(
            err(
                "decimal_whole_digits",
                loc,
                f"Decimal input should have no more than {COST_WHOLE_DIGITS} digits before the"
                " decimal point (amounts are in cents)",
                value,
            )
        )
        return None
    return format(Decimal((sign, tuple(kept), exponent)), "f")


def llm(value: Any, loc: Loc, errors: list[FieldError]) -> dict[str, Any] | None:
    if not is_dict(value, loc, errors):
        return None
    before = len(errors)
    extras(value, LLM_FIELDS, loc, errors)
    out: dict[str, Any] = {
        "vendor": string(
            value.get("vendor", MISSING), (*loc, "vendor"), errors, 1, LLM_STRING_LENGTH
        ),
        "model": string(value.get("model", MISSING), (*loc, "model"), errors, 1, LLM_STRING_LENGTH),
    }
    for key in ("prompt", "response"):
        text = value.get(key)
        out[key] = None if text is None else string(text, (*loc, key), errors, 0, None)
    for key in LLM_TOKENS:
        out[key] = _tokens(value.get(key, MISSING), (*loc, key), errors)
    if value.get("cached_input_tokens") is not None:
        out["cached_input_tokens"] = _tokens(
            value["cached_input_tokens"], (*loc, "cached_input_tokens"), errors
        )
    return None if len(errors) != before else out


def _tokens(value: Any, loc: Loc, errors: list[FieldError]) -> int | None:
    if value is MISSING:
        errors.append(err("missing", loc, "Field required", None))
        return None
    if type(value) is not int:
        errors.append(_not_an_integer(value, loc))
        return None
    if value < 0:
        errors.append(
            err("greater_than_equal", loc, "Input should be greater than or equal to 0", value)
        )
        return None
    if value >= NUMBER_LIMIT:
        errors.append(err("less_than", loc, f"Input should be less than {NUMBER_LIMIT}", value))
        return None
    return value


def _not_an_integer(value: Any, loc: Loc) -> FieldError:
    """Polar's type where Polar refuses the value too; `int_type` where only meterline does
    (Polar coerces `"3"`, `3.0` and `true`)."""
    if type(value) is float and math.isfinite(value) and not value.is_integer():
        return err(
            "int_from_float",
            loc,
            "Input should be a valid integer, got a number with a fractional part",
            value,
        )
    if type(value) is str and not value.strip().lstrip("+-").isdigit():
        return err(
            "int_parsing",
            loc,
            "Input should be a valid integer, unable to parse string as an integer",
            value,
        )
    return err("int_type", loc, "Input should be a valid integer", value)
