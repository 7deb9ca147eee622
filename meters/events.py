"""Usage events and the one set of rules every ingested event must pass.

Polar's rules (polar-contract §1.2–1.4), stricter where Polar is sloppy (DESIGN decision 4):
both customer ids at once, NaN/Inf, empty strings used as keys, metadata keys that meter paths
cannot reach, unknown fields and currencies other than exactly ``usd`` are rejected instead of
silently dropped or accepted. Validation is all-or-nothing: every error of the batch is collected
and reported with its ``loc`` (``["body", "events", i, ...]``), and nothing is stored.

The validator is hand-written rather than a pydantic model: it is the hot path of ingest
(a few microseconds per event) and it owns the exact error locations.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from meters.errors import FieldError, Loc, ValidationFailed

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
# Timestamps DuckDB and every client can represent: years 1..9999.
_MIN_TS_US = (datetime(1, 1, 2, tzinfo=UTC) - EPOCH) // _ONE_US
_MAX_TS_US = (datetime(9999, 12, 30, tzinfo=UTC) - EPOCH) // _ONE_US
MAX_ERRORS = 1000
# Numbers in metadata and token counts: finite and within the 64-bit integer range, so that
# byte counts and nanosecond timestamps fit and no sum of them can overflow to infinity.
NUMBER_LIMIT = 2**63
_BODY_FIELDS = frozenset({"events"})

EVENT_FIELDS = frozenset(
    {
        "name",
        "timestamp",
        "customer_id",
        "external_customer_id",
        "external_id",
        "parent_id",
        "metadata",
        "organization_id",
        "member_id",
        "external_member_id",
    }
)
_COST_FIELDS = frozenset({"amount", "currency"})
_LLM_REQUIRED_INT = ("input_tokens", "output_tokens", "total_tokens")
_LLM_FIELDS = frozenset(
    {"vendor", "model", "prompt", "response", "cached_input_tokens", *_LLM_REQUIRED_INT}
)


@dataclass(frozen=True, slots=True)
class EventRules:
    """Limits applied to every event; configurable per deployment."""

    max_future: timedelta = timedelta(minutes=5)
    max_name_length: int = 128
    max_id_length: int = 512
    max_metadata_keys: int = 50
    max_metadata_key_length: int = 40
    max_metadata_string_length: int = 500


@dataclass(slots=True)
class Event:
    """One validated user event, normalized (UTC microseconds, canonical decimal strings)."""

    name: str
    timestamp_us: int
    customer_id: str | None
    external_customer_id: str | None
    external_id: str | None
    parent_id: str | None
    external_member_id: str | None
    metadata: dict[str, Any]
    cost_amount: str | None  # the same canonical string as metadata["_cost"]["amount"]


def now_us() -> int:
    return (datetime.now(UTC) - EPOCH) // _ONE_US


def datetime_to_us(moment: datetime) -> int:
    """A timezone-aware datetime as UTC microseconds since the epoch."""
    return (moment - EPOCH) // _ONE_US


def us_to_datetime(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def us_to_iso(value: int) -> str:
    """UTC microseconds as ISO 8601 with a `Z` (how Polar writes times)."""
    return us_to_datetime(value).isoformat().replace("+00:00", "Z")


def parse_ingest_body(body: Any, *, now: int, rules: EventRules) -> list[Event]:
    """Validate a decoded ``{"events": [...]}`` body; raise ValidationFailed listing every error."""
    errors: list[FieldError] = []
    if not isinstance(body, dict):
        raise ValidationFailed([_err("model_attributes_type", ("body",), _DICT_MSG, body)])
    _extras(body, _BODY_FIELDS, ("body",), errors)
    raw = body.get("events", _MISSING)
    if raw is _MISSING:
        raise ValidationFailed(
            [*errors, _err("missing", ("body", "events"), "Field required", body)]
        )
    if not isinstance(raw, list):
        raise ValidationFailed(
            [*errors, _err("list_type", ("body", "events"), "Input should be a valid list", raw)]
        )
    latest = now + rules.max_future // _ONE_US
    events: list[Event] = []
    for i, item in enumerate(raw):
        event = _fast_event(item, now, latest, rules) or _event(
            item, ("body", "events", i), errors, now, latest, rules
        )
        if event is not None:
            events.append(event)
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise ValidationFailed(errors[:MAX_ERRORS])
    return events


_MISSING: Any = object()
_DICT_MSG = "Input should be a valid dictionary or object to extract fields from"


def _err(type_: str, loc: Loc, msg: str, value: Any) -> FieldError:
    return FieldError(type_, loc, msg, value)


def _fast_event(item: Any, now: int, latest: int, rules: EventRules) -> Event | None:
    """The common case, checked without building error locations: a valid event, or None.

    None means "not sure": `_event` then re-checks the item and reports exact errors. Both
    must produce the same Event for valid input (a property test holds them to it).
    """
    if type(item) is not dict or not EVENT_FIELDS.issuperset(item):
        return None
    max_id = rules.max_id_length
    name = item.get("name")
    if type(name) is not str or not 0 < len(name) <= rules.max_name_length or "\x00" in name:
        return None
    customer_id = item.get("customer_id")
    external_customer_id = item.get("external_customer_id")
    if customer_id is not None:
        if external_customer_id is not None or type(customer_id) is not str:
            return None
        if _UUID4.fullmatch(customer_id) is None:
            return None  # the slow path accepts other spellings and normalizes them
    elif not _short(external_customer_id, max_id):
        return None
    external_id = item.get("external_id")
    parent_id = item.get("parent_id")
    member = item.get("external_member_id")
    if (
        (external_id is not None and not _short(external_id, max_id))
        or (parent_id is not None and not _short(parent_id, max_id))
        or (member is not None and not _short(member, max_id))
        or item.get("organization_id") is not None
        or item.get("member_id") is not None
    ):
        return None
    ts = item.get("timestamp")
    if ts is None:
        timestamp = now
    elif type(ts) is str:
        try:
            parsed = datetime.fromisoformat(ts)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        timestamp = (parsed - EPOCH) // _ONE_US
        if not _MIN_TS_US <= timestamp <= min(latest, _MAX_TS_US):
            return None
    else:
        return None
    metadata = item.get("metadata")
    cost: str | None = None
    if metadata is None:
        metadata = {}
    elif type(metadata) is not dict or len(metadata) > rules.max_metadata_keys:
        return None
    else:
        max_key = rules.max_metadata_key_length
        max_value = rules.max_metadata_string_length
        special = False
        for key, value in metadata.items():
            if key == "_cost" or key == "_llm":
                special = True
                continue
            if not 0 < len(key) <= max_key or "." in key or "\x00" in key:
                return None
            kind = type(value)
            if kind is str:
                if not 0 < len(value) <= max_value or "\x00" in value:
                    return None
            elif kind is float or kind is int:
                if not -NUMBER_LIMIT <= value < NUMBER_LIMIT:  # NaN fails too
                    return None
            elif kind is not bool:
                return None
        if special:
            metadata = dict(metadata)
            if "_cost" in metadata:
                parsed_cost = _fast_cost(metadata["_cost"])
                if parsed_cost is None:
                    return None
                metadata["_cost"] = parsed_cost
                cost = parsed_cost["amount"]
            if "_llm" in metadata:
                llm = _fast_llm(metadata["_llm"])
                if llm is None:
                    return None
                metadata["_llm"] = llm
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


_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _short(value: Any, max_length: int) -> bool:
    return type(value) is str and 0 < len(value) <= max_length and "\x00" not in value


def _fast_cost(value: Any) -> dict[str, str] | None:
    if type(value) is not dict or len(value) != 2 or value.get("currency") != "usd":
        return None
    amount = _plain_amount(value.get("amount"))
    return None if amount is None else {"amount": amount, "currency": "usd"}


_PLAIN_DECIMAL = re.compile(r"(-?)([0-9]{1,5})(?:\.([0-9]{0,12}))?")


def _plain_amount(value: Any) -> str | None:
    """`parse_cost_amount` for plain decimals ("0.0371", 12, 0.5), without Decimal's cost."""
    kind = type(value)
    if kind is str:
        text = value
    elif kind is float or kind is int:
        text = repr(value)
    else:
        return None
    match = _PLAIN_DECIMAL.fullmatch(text)
    if match is None:
        return None
    sign, whole, fraction = match.groups()
    whole = whole.lstrip("0") or "0"
    fraction = (fraction or "").rstrip("0")
    if whole == "0" and not fraction:
        return "0"
    return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"


def _fast_llm(value: Any) -> dict[str, Any] | None:
    if type(value) is not dict or not _LLM_FIELDS.issuperset(value):
        return None
    vendor = value.get("vendor")
    model = value.get("model")
    prompt = value.get("prompt")
    response = value.get("response")
    if not (_short(vendor, 500) and _short(model, 500)):
        return None
    if (prompt is not None and (type(prompt) is not str or "\x00" in prompt)) or (
        response is not None and (type(response) is not str or "\x00" in response)
    ):
        return None
    out: dict[str, Any] = {"vendor": vendor, "model": model, "prompt": prompt, "response": response}
    for key in _LLM_REQUIRED_INT:
        tokens = value.get(key)
        if type(tokens) is not int or not 0 <= tokens < NUMBER_LIMIT:
            return None
        out[key] = tokens
    cached = value.get("cached_input_tokens")
    if cached is not None:
        if type(cached) is not int or not 0 <= cached < NUMBER_LIMIT:
            return None
        out["cached_input_tokens"] = cached
    return out


def _event(
    item: Any,
    loc: Loc,
    errors: list[FieldError],
    now: int,
    latest: int,
    rules: EventRules,
) -> Event | None:
    if not isinstance(item, dict):
        errors.append(_err("model_attributes_type", loc, _DICT_MSG, item))
        return None
    before = len(errors)
    _extras(item, EVENT_FIELDS, loc, errors)
    name = _string(item.get("name", _MISSING), (*loc, "name"), errors, 1, rules.max_name_length)
    customer_id, external_customer_id = _customer(item, loc, errors, rules)
    external_id = _optional_string(item, "external_id", loc, errors, rules.max_id_length)
    parent_id = _optional_string(item, "parent_id", loc, errors, rules.max_id_length)
    member = _optional_string(item, "external_member_id", loc, errors, rules.max_id_length)
    if item.get("organization_id") is not None:
        errors.append(
            _err(
                "organization_token",
                (*loc, "organization_id"),
                "Setting organization_id is disallowed when using an organization token.",
                item["organization_id"],
            )
        )
    if item.get("member_id") is not None:
        errors.append(
            _err(
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


def _extras(
    value: dict[str, Any], allowed: frozenset[str], loc: Loc, errors: list[FieldError]
) -> None:
    """Unknown fields are errors: a typo must not silently drop data."""
    if not allowed.issuperset(value):
        errors.extend(
            _err("extra_forbidden", (*loc, key), "Extra inputs are not permitted", value[key])
            for key in value
            if key not in allowed
        )


def _string(
    value: Any, loc: Loc, errors: list[FieldError], min_length: int, max_length: int | None
) -> str | None:
    if value is _MISSING:
        errors.append(_err("missing", loc, "Field required", None))
        return None
    if type(value) is not str:
        errors.append(_err("string_type", loc, "Input should be a valid string", value))
        return None
    if len(value) < min_length:
        errors.append(
            _err(
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
            _err(
                "string_too_long", loc, f"String should have at most {max_length} characters", value
            )
        )
        return None
    if "\x00" in value:
        errors.append(_err("string_null_byte", loc, "String should not contain NUL bytes", value))
        return None
    return value


def _optional_string(
    item: dict[str, Any], key: str, loc: Loc, errors: list[FieldError], max_length: int
) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    return _string(value, (*loc, key), errors, 1, max_length)


def _customer(
    item: dict[str, Any], loc: Loc, errors: list[FieldError], rules: EventRules
) -> tuple[str | None, str | None]:
    raw_id = item.get("customer_id")
    raw_external = item.get("external_customer_id")
    if raw_id is not None and raw_external is not None:
        errors.append(
            _err(
                "customer_ambiguous",
                (*loc, "customer_id"),
                "Set either customer_id or external_customer_id, not both.",
                {"customer_id": raw_id, "external_customer_id": raw_external},
            )
        )
        return None, None
    if raw_id is None and raw_external is None:
        errors.append(
            _err(
                "missing",
                (*loc, "customer_id"),
                "Field required: set customer_id or external_customer_id.",
                None,
            )
        )
        return None, None
    if raw_external is not None:
        external = _string(
            raw_external, (*loc, "external_customer_id"), errors, 1, rules.max_id_length
        )
        return None, external
    customer_loc = (*loc, "customer_id")
    if type(raw_id) is not str:
        errors.append(_err("uuid_type", customer_loc, "UUID input should be a string", raw_id))
        return None, None
    try:
        parsed = uuid.UUID(raw_id)
    except ValueError:
        errors.append(_err("uuid_parsing", customer_loc, "Input should be a valid UUID", raw_id))
        return None, None
    if parsed.version != 4:
        errors.append(_err("uuid_version", customer_loc, "UUID version 4 expected", raw_id))
        return None, None
    return str(parsed), None


def _timestamp(value: Any, loc: Loc, errors: list[FieldError], latest: int) -> int | None:
    if type(value) is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            errors.append(
                _err("datetime_parsing", loc, "Input should be a valid ISO 8601 datetime", value)
            )
            return None
        if parsed.tzinfo is None:
            errors.append(_err("timezone_aware", loc, "Input should have timezone info", value))
            return None
        try:
            result = (parsed - EPOCH) // _ONE_US
        except OverflowError:
            result = _MAX_TS_US + 1
    elif type(value) is int or type(value) is float:
        if not math.isfinite(value) or abs(value) > 1e13:
            errors.append(_err("datetime_range", loc, "Timestamp is out of range", value))
            return None
        result = round(value * 1_000_000)
    else:
        errors.append(
            _err("datetime_type", loc, "Input should be a valid datetime or epoch seconds", value)
        )
        return None
    if not _MIN_TS_US <= result <= _MAX_TS_US:
        errors.append(_err("datetime_range", loc, "Timestamp is out of range", value))
        return None
    if result > latest:
        errors.append(
            _err(
                "timestamp_future",
                loc,
                "Timestamp must be in the past (or within the allowed clock skew).",
                value,
            )
        )
        return None
    return result


def _metadata(
    value: Any, loc: Loc, errors: list[FieldError], rules: EventRules
) -> tuple[dict[str, Any] | None, str | None]:
    if type(value) is not dict:
        errors.append(_err("dict_type", loc, "Input should be a valid dictionary", value))
        return None, None
    if len(value) > rules.max_metadata_keys:
        errors.append(
            _err(
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
        if key == "_cost":
            parsed_cost = _cost(item, key_loc, errors)
            if parsed_cost is not None:
                cost = parsed_cost["amount"]
                out[key] = parsed_cost
        elif key == "_llm":
            llm = _llm(item, key_loc, errors)
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
            _err(
                "metadata_key",
                loc,
                f"Metadata keys should have 1 to {rules.max_metadata_key_length} characters",
                key,
            )
        )
        return False
    if "." in key or "\x00" in key:
        errors.append(
            _err(
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
        return _string(value, loc, errors, 1, rules.max_metadata_string_length) is not None
    if kind is bool:
        return True
    if kind is int or kind is float:
        if -NUMBER_LIMIT <= value < NUMBER_LIMIT:
            return True
        if kind is float and not math.isfinite(value):
            errors.append(_err("finite_number", loc, "Input should be a finite number", value))
        else:
            errors.append(_err("number_range", loc, _RANGE_MSG, value))
        return False
    errors.append(
        _err(
            "metadata_value",
            loc,
            "Input should be a valid string, integer, number or boolean",
            value,
        )
    )
    return False


def _cost(value: Any, loc: Loc, errors: list[FieldError]) -> dict[str, str] | None:
    if type(value) is not dict:
        errors.append(_err("dict_type", loc, "Input should be a valid dictionary", value))
        return None
    before = len(errors)
    _extras(value, _COST_FIELDS, loc, errors)
    amount = parse_cost_amount(value.get("amount", _MISSING), (*loc, "amount"), errors)
    currency = value.get("currency", _MISSING)
    if currency is _MISSING:
        errors.append(_err("missing", (*loc, "currency"), "Field required", None))
    elif currency != "usd":
        errors.append(
            _err(
                "currency",
                (*loc, "currency"),
                "Only 'usd' (lowercase) is supported",
                currency,
            )
        )
    if len(errors) != before or amount is None:
        return None
    return {"amount": amount, "currency": "usd"}


def parse_cost_amount(value: Any, loc: Loc, errors: list[FieldError]) -> str | None:
    """Parse a `_cost.amount` (cents) into its canonical decimal string: Decimal(17, 12)."""
    if value is _MISSING:
        errors.append(_err("missing", loc, "Field required", None))
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
            raise InvalidOperation
    except InvalidOperation:
        errors.append(_err("decimal_parsing", loc, "Input should be a valid decimal", value))
        return None
    if not number.is_finite():
        errors.append(_err("finite_number", loc, "Input should be a finite number", value))
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
    if -exponent > 12:
        errors.append(
            _err(
                "decimal_max_places",
                loc,
                "Decimal input should have no more than 12 decimal places",
                value,
            )
        )
        return None
    if len(kept) + exponent > 5:
        errors.append(
            _err(
                "decimal_whole_digits",
                loc,
                "Decimal input should have no more than 5 digits before the decimal point "
                "(amounts are in cents)",
                value,
            )
        )
        return None
    return format(Decimal((sign, tuple(kept), exponent)), "f")


def _llm(value: Any, loc: Loc, errors: list[FieldError]) -> dict[str, Any] | None:
    if type(value) is not dict:
        errors.append(_err("dict_type", loc, "Input should be a valid dictionary", value))
        return None
    before = len(errors)
    _extras(value, _LLM_FIELDS, loc, errors)
    out: dict[str, Any] = {
        "vendor": _string(value.get("vendor", _MISSING), (*loc, "vendor"), errors, 1, 500),
        "model": _string(value.get("model", _MISSING), (*loc, "model"), errors, 1, 500),
    }
    for key in ("prompt", "response"):
        text = value.get(key)
        out[key] = None if text is None else _string(text, (*loc, key), errors, 0, None)
    for key in _LLM_REQUIRED_INT:
        out[key] = _tokens(value.get(key, _MISSING), (*loc, key), errors)
    if value.get("cached_input_tokens") is not None:
        out["cached_input_tokens"] = _tokens(
            value["cached_input_tokens"], (*loc, "cached_input_tokens"), errors
        )
    return None if len(errors) != before else out


def _tokens(value: Any, loc: Loc, errors: list[FieldError]) -> int | None:
    if value is _MISSING:
        errors.append(_err("missing", loc, "Field required", None))
        return None
    if type(value) is not int:
        errors.append(_err("int_type", loc, "Input should be a valid integer", value))
        return None
    if value < 0:
        errors.append(
            _err("greater_than_equal", loc, "Input should be greater than or equal to 0", value)
        )
        return None
    if value >= NUMBER_LIMIT:
        errors.append(_err("less_than", loc, f"Input should be less than {NUMBER_LIMIT}", value))
        return None
    return value
