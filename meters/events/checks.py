"""Field checks that report what is wrong: the shared pieces of the exact validator."""

from __future__ import annotations

from typing import Any

from meters.errors import FieldError, Loc

# A field that is absent (as opposed to null).
MISSING: Any = object()
DICT_MSG = "Input should be a valid dictionary or object to extract fields from"
# Polar refuses NUL characters in every field (its `Schema`), with pydantic's value_error.
NUL_MSG = "Value error, This value contains invalid characters"


def err(type_: str, loc: Loc, msg: str, value: Any) -> FieldError:
    return FieldError(type_, loc, msg, value)


def is_dict(value: Any, loc: Loc, errors: list[FieldError]) -> bool:
    """A JSON object where one is required (metadata, `_cost`, `_llm`); else an error."""
    if type(value) is dict:
        return True
    errors.append(err("dict_type", loc, "Input should be a valid dictionary", value))
    return False


def extras(
    value: dict[str, Any], allowed: frozenset[str], loc: Loc, errors: list[FieldError]
) -> None:
    """Unknown fields are errors: a typo must not silently drop data."""
    if not allowed.issuperset(value):
        errors.extend(
            err("extra_forbidden", (*loc, key), "Extra inputs are not permitted", value[key])
            for key in value
            if key not in allowed
        )


def string(
    value: Any, loc: Loc, errors: list[FieldError], min_length: int, max_length: int | None
) -> str | None:
    if value is MISSING:
        errors.append(err("missing", loc, "Field required", None))
        return None
    if type(value) is not str:
        errors.append(err("string_type", loc, "Input should be a valid string", value))
        return None
    if len(value) < min_length:
        errors.append(
            err(
                "string_too_short",
                loc,
                f"String should have at least {min_length} character"
                + ("s" if min_length > 1 else ""),
                value,
            )
        )
        return None
    if max_length is not None and len(value) > max_length:
        errors.append(
            err(
                "string_too_long", loc, f"String should have at most {max_length} characters", value
            )
        )
        return None
    if "\x00" in value:
        errors.append(err("value_error", loc, NUL_MSG, value))
        return None
    return value
