"""The exact validator: every rule, every error with its location.

Polar's rules (docs/internals/decisions.md, §1.2–1.4), stricter where Polar is sloppy (decision 4):
both customer ids at once, NaN/Inf, empty strings used as keys, metadata keys that meter paths
cannot reach, unknown fields and currencies other than exactly ``usd`` are rejected instead of
silently dropped or accepted. Validation is all-or-nothing: every error of the batch is collected
and reported with its ``loc`` (``["body", "events", i, ...]``), and nothing is stored.

This is the reference: the compiled validator (`compiled.py`) decides the common case faster and
hands everything else here. It also accepts the spellings the compiled one leaves out (epoch
timestamps, upper-case or braced UUIDs, padded amounts) and normalizes them.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any

from meters.errors import FieldError, Loc, ValidationFailed
from meters.events import usage
from meters.events.checks import DICT_MSG, MISSING, err, extras, is_dict, string
from meters.events.schema import (
    COST_KEY,
    EVENT_FIELDS,
    LLM_KEY,
    MAX_ERRORS,
    NUMBER_LIMIT,
    Event,
)
from meters.settings import EventRules
from meters.times import EPOCH, MAX_TS_US, MIN_TS_US, ONE_US

_BODY_FIELDS = frozenset({"events"})


def parse_ingest_body(body: Any, *, now: int, rules: EventRules) -> list[Event]:
    """Validate a decoded ``{"events": [...]}`` body; raise ValidationFailed listing every error."""
    errors: list[FieldError] = []
    if not isinstance(body, dict):
        raise ValidationFailed([err("model_attributes_type", ("body",), DICT_MSG, body)])
    extras(body, _BODY_FIELDS, ("body",), errors)
    raw = body.get("events", MISSING)
    if raw is MISSING:
        raise ValidationFailed(
            [*errors, err("missing", ("body", "events"), "Field required", body)]
        )
    if not isinstance(raw, list):
        raise ValidationFailed(
            [*errors, err("list_type", ("body", "events"), "Input should be a valid list", raw)]
        )
    latest = now + rules.max_future // ONE_US
    events: list[Event] = []
    for i, item in enumerate(raw):
        event = _event(item, ("body", "events", i), errors, now, latest, rules)
        if event is not None:
            events.append(event)
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise ValidationFailed(errors[:MAX_ERRORS])
    return events


def _event(
    item: Any,
    loc: Loc,
    errors: list[FieldError],
    now: int,
    latest: int,
    rules: EventRules,
) -> Event | None:
    if not isinstance(item, dict):
        errors.append(err("model_attributes_type", loc, DICT_MSG, item))
        return None
    before = len(errors)
    extras(item, EVENT_FIELDS, loc, errors)
    name = string(item.get("name", MISSING), (*loc, "name"), errors, 1, rules.max_name_length)
    customer_id, external_customer_id = _customer(item, loc, errors, rules)
    external_id = _optional_string(item, "external_id", loc, errors, rules.max_id_length)
    parent_id = _optional_string(item, "parent_id", loc, errors, rules.max_id_length)
    member = _optional_string(item, "external_member_id", loc, errors, rules.max_id_length)
    if item.get("organization_id") is not None:
        errors.append(
            err(
                "organization_token",
                (*loc, "organization_id"),
                "Setting organization_id is disallowed when using an organization token.",
                item["organization_id"],
            )
        )
    if item.get("member_id") is not None:
        errors.append(
            err(
                "member_id",
                (*loc, "member_id"),
                "Members are not supported; identify the member with external_member_id.",
                item["member_id"],
            )
        )
    ts = item.get("timestamp")
    timestamp = now if ts is None else _timestamp(ts, (*loc, "timestamp"), errors, latest)
    raw_metadata = item.get("metadata")
    metadata: dict[str, Any] | None = {}
    cost: str | None = None
    if raw_metadata is not None:
        metadata, cost = _metadata(raw_metadata, (*loc, "metadata"), errors, rules)
    if len(errors) != before:
        return None
    assert name is not None and metadata is not None and timestamp is not None
    return Event(
        name,
        timestamp,
        customer_id,
        external_customer_id,
        external_id,
        parent_id,
        member,
        metadata,
        cost,
    )


def _optional_string(
    item: dict[str, Any], key: str, loc: Loc, errors: list[FieldError], max_length: int
) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    return string(value, (*loc, key), errors, 1, max_length)


def _customer(
    item: dict[str, Any], loc: Loc, errors: list[FieldError], rules: EventRules
) -> tuple[str | None, str | None]:
    raw_id = item.get("customer_id")
    raw_external = item.get("external_customer_id")
    if raw_id is not None and raw_external is not None:
        errors.append(
            err(
                "customer_ambiguous",
                (*loc, "customer_id"),
                "Set either customer_id or external_customer_id, not both.",
                {"customer_id": raw_id, "external_customer_id": raw_external},
            )
        )
        return None, None
    if raw_id is None and raw_external is None:
        errors.append(
            err(
                "missing",
                (*loc, "customer_id"),
                "Field required: set customer_id or external_customer_id.",
                None,
            )
        )
        return None, None
    if raw_external is not None:
        external = string(
            raw_external, (*loc, "external_customer_id"), errors, 1, rules.max_id_length
        )
        return None, external
    customer_loc = (*loc, "customer_id")
    if type(raw_id) is not str:
        errors.append(err("uuid_type", customer_loc, "UUID input should be a string", raw_id))
        return None, None
    try:
        parsed = uuid.UUID(raw_id)
    except ValueError:
        errors.append(err("uuid_parsing", customer_loc, "Input should be a valid UUID", raw_id))
        return None, None
    if parsed.version != 4:
        errors.append(err("uuid_version", customer_loc, "UUID version 4 expected", raw_id))
        return None, None
    return str(parsed), None


# Pydantic's (so Polar's) rule for epoch numbers: beyond this many seconds, they are milliseconds
# (what JavaScript's Date.now() sends).
_EPOCH_MS_ABOVE = 2e10


def _timestamp(value: Any, loc: Loc, errors: list[FieldError], latest: int) -> int | None:
    if type(value) is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            errors.append(
                err(
                    "datetime_from_date_parsing",
                    loc,
                    "Input should be a valid ISO 8601 datetime",
                    value,
                )
            )
            return None
        if parsed.tzinfo is None:
            errors.append(err("timezone_aware", loc, "Input should have timezone info", value))
            return None
        try:
            result = (parsed - EPOCH) // ONE_US
        except OverflowError:
            result = MAX_TS_US + 1
        if not MIN_TS_US <= result <= MAX_TS_US:
            errors.append(err("datetime_range", loc, "Timestamp is out of range", value))
            return None
    elif type(value) is int or type(value) is float:
        scale = 1_000 if abs(value) > _EPOCH_MS_ABOVE else 1_000_000
        if not math.isfinite(value):
            result = MAX_TS_US + 1
        else:
            # Whole and fraction apart: a float product this large would round away microseconds.
            whole = math.floor(value)
            result = whole * scale + round((value - whole) * scale)
        if not MIN_TS_US <= result <= MAX_TS_US:
            errors.append(
                err(
                    "datetime_parsing",
                    loc,
                    "Input should be a valid datetime: epoch seconds (or milliseconds, beyond"
                    f" {_EPOCH_MS_ABOVE:.0e}) within the years 1 to 9999",
                    value,
                )
            )
            return None
    else:
        errors.append(
            err("datetime_type", loc, "Input should be a valid datetime or epoch seconds", value)
        )
        return None
    if result > latest:
        errors.append(
            err(
                "value_error",
                loc,
                "Value error, Timestamp must be in the past (or within the allowed clock skew).",
                value,
            )
        )
        return None
    return result


def _metadata(
    value: Any, loc: Loc, errors: list[FieldError], rules: EventRules
) -> tuple[dict[str, Any] | None, str | None]:
    if not is_dict(value, loc, errors):
        return None, None
    if len(value) > rules.max_metadata_keys:
        errors.append(
            err(
                "too_long",
                loc,
                f"Metadata should have at most {rules.max_metadata_keys} keys",
                len(value),
            )
        )
        return None, None
    out: dict[str, Any] = {}
    cost: str | None = None
    for key, item in value.items():
        key_loc = (*loc, key)
        if key == COST_KEY:
            parsed_cost = usage.cost(item, key_loc, errors)
            if parsed_cost is not None:
                cost = parsed_cost["amount"]
                out[key] = parsed_cost
        elif key == LLM_KEY:
            llm = usage.llm(item, key_loc, errors)
            if llm is not None:
                out[key] = llm
        elif _metadata_key_ok(key, key_loc, errors, rules) and _metadata_value_ok(
            item, key_loc, errors, rules
        ):
            out[key] = item
    return out, cost


def _metadata_key_ok(key: str, loc: Loc, errors: list[FieldError], rules: EventRules) -> bool:
    if not 1 <= len(key) <= rules.max_metadata_key_length:
        errors.append(
            err(
                "metadata_key",
                loc,
                f"Metadata keys should have 1 to {rules.max_metadata_key_length} characters",
                key,
            )
        )
        return False
    if "." in key or "\x00" in key:
        errors.append(
            err(
                "metadata_key",
                loc,
                "Metadata keys cannot contain '.' (meter paths split on it) or NUL bytes",
                key,
            )
        )
        return False
    return True


_RANGE_MSG = (
    f"Input should be a number from -{NUMBER_LIMIT} to {NUMBER_LIMIT - 1} (the 64-bit integer"
    " range)"
)


def _metadata_value_ok(value: Any, loc: Loc, errors: list[FieldError], rules: EventRules) -> bool:
    kind = type(value)
    if kind is str:
        return string(value, loc, errors, 1, rules.max_metadata_string_length) is not None
    if kind is bool:
        return True
    if kind is int or kind is float:
        if -NUMBER_LIMIT <= value < NUMBER_LIMIT:
            return True
        if kind is float and not math.isfinite(value):
            errors.append(err("finite_number", loc, "Input should be a finite number", value))
        else:
            errors.append(err("number_range", loc, _RANGE_MSG, value))
        return False
    # Polar's first error for a value none of its union's members takes.
    errors.append(
        err("string_type", loc, "Input should be a valid string, integer, number or boolean", value)
    )
    return False
