"""The ingest event validator: valid batches normalize, every broken rule is reported at its loc."""

from __future__ import annotations

import copy
import functools
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import AwareDatetime, TypeAdapter

from meters.errors import FieldError, Loc, ValidationFailed
from meters.events import EVENT_FIELDS, MAX_ERRORS, Event, EventRules, parse_ingest_body
from tests.strategies import (
    EPOCH,
    KEY_TEXT,
    LATEST,
    NOW_US,
    ONE_US,
    RESERVED_METADATA_KEYS,
    format_offset,
    llms,
    metadata_keys,
    metadata_values,
    offsets,
    texts,
    to_us,
    valid_events,
)

RULES = EventRules()
LATEST_ALLOWED_US = NOW_US + RULES.max_future // ONE_US


def parse(events: Any, *, now: int = NOW_US) -> list[Event]:
    return parse_ingest_body({"events": events}, now=now, rules=RULES)


def errors_of(body: Any, *, now: int = NOW_US) -> list[FieldError]:
    with pytest.raises(ValidationFailed) as info:
        parse_ingest_body(body, now=now, rules=RULES)
    assert info.value.errors, "ValidationFailed without errors"
    return info.value.errors


@functools.cache  # built once: see tests/strategies.py
def batches(min_size: int = 0, max_size: int = 6) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(valid_events(), min_size=min_size, max_size=max_size)


# --- Independent expectations -------------------------------------------------------------

_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
    r"(Z|[+-]\d{2}:\d{2})"
)
_CANONICAL_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")


def expected_timestamp_us(value: Any) -> int:
    """What `timestamp` should normalize to, computed with datetime arithmetic only."""
    if value is None:
        return NOW_US
    if isinstance(value, str):
        match = _ISO.fullmatch(value)
        assert match is not None, value
        year, month, day, hour, minute, second, fraction, offset = match.groups()
        zone = UTC
        if offset != "Z":
            sign = -1 if offset[0] == "-" else 1
            zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=zone,
        )
        return (moment - EPOCH) // ONE_US
    return (EPOCH + timedelta(seconds=value) - EPOCH) // ONE_US


def decimal_value(amount: str | int | float) -> Decimal:
    """The number a client meant: a float is what its JSON text (shortest repr) says."""
    return Decimal(repr(amount)) if isinstance(amount, float) else Decimal(amount)


# --- Valid batches --------------------------------------------------------------------------


@given(batches(max_size=10))
def test_valid_batches_parse_in_order_and_normalize(raw: list[dict[str, Any]]) -> None:
    sent = copy.deepcopy(raw)
    events = parse(sent)
    assert sent == raw, "the validator must not mutate its input"
    assert len(events) == len(raw)
    for event, source in zip(events, raw, strict=True):
        assert event.name == source["name"]
        assert event.customer_id == source.get("customer_id")
        assert event.external_customer_id == source.get("external_customer_id")
        assert event.external_id == source.get("external_id")
        assert event.parent_id == source.get("parent_id")
        assert event.external_member_id == source.get("external_member_id")
        assert event.timestamp_us == expected_timestamp_us(source.get("timestamp"))
        assert event.timestamp_us <= NOW_US

        metadata = source.get("metadata") or {}
        assert list(event.metadata) == list(metadata)
        for key, value in metadata.items():
            if key not in RESERVED_METADATA_KEYS:
                assert event.metadata[key] == value
                assert type(event.metadata[key]) is type(value)
        if "_llm" in metadata:
            llm = event.metadata["_llm"]
            for key, value in metadata["_llm"].items():
                assert llm[key] == value
        if "_cost" in metadata:
            amount = event.metadata["_cost"]["amount"]
            assert event.cost_amount == amount
            assert event.metadata["_cost"]["currency"] == "usd"
            assert isinstance(amount, str)
            assert _CANONICAL_DECIMAL.fullmatch(amount), amount
            assert amount != "-0"
            assert Decimal(amount) == decimal_value(metadata["_cost"]["amount"])
        else:
            assert event.cost_amount is None


@given(st.lists(valid_events(st.none()), min_size=1, max_size=5))
def test_events_without_timestamp_happen_now(raw: list[dict[str, Any]]) -> None:
    assert {event.timestamp_us for event in parse(raw)} == {NOW_US}


def test_empty_batch_is_valid() -> None:
    assert parse([]) == []


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2024-03-10T12:00:00+05:30", datetime(2024, 3, 10, 6, 30, tzinfo=UTC)),
        ("2024-03-10T12:00:00-04:00", datetime(2024, 3, 10, 16, 0, tzinfo=UTC)),
        ("2024-03-10T12:00:00.000001Z", datetime(2024, 3, 10, 12, 0, 0, 1, tzinfo=UTC)),
        ("1969-12-31T23:59:59.999999+00:00", datetime(1969, 12, 31, 23, 59, 59, 999999, UTC)),
        (0, EPOCH),
        (-1.5, EPOCH - timedelta(seconds=1.5)),
        (1710072000.123456, datetime(2024, 3, 10, 12, 0, 0, 123456, tzinfo=UTC)),
        # Beyond 2e10, epoch numbers are milliseconds (pydantic's rule, so Polar's).
        (1710072000123, datetime(2024, 3, 10, 12, 0, 0, 123000, tzinfo=UTC)),
        (-20_000_000_001, EPOCH - timedelta(milliseconds=20_000_000_001)),
    ],
)
def test_timestamp_examples(timestamp: Any, expected: datetime) -> None:
    (event,) = parse([{"name": "n", "external_customer_id": "c", "timestamp": timestamp}])
    assert event.timestamp_us == to_us(expected)


@given(
    st.one_of(
        st.integers(-(6 * 10**13), 10**13),  # years 68 to 2286, inside 1..9999
        st.floats(-6e13, 1e13, allow_nan=False).map(lambda f: round(f, 3)),
    )
)
def test_epoch_numbers_are_read_as_polar_reads_them(epoch: int | float) -> None:
    polars = TypeAdapter(AwareDatetime).validate_python(epoch)
    if to_us(polars) > NOW_US:
        return  # the future tolerance differs (a row of docs/reference/polar.md)
    (event,) = parse([{"name": "n", "external_customer_id": "c", "timestamp": epoch}])
    assert abs(event.timestamp_us - to_us(polars)) <= 1  # float rounding, at most 1 µs


def test_clock_skew_limit_is_inclusive() -> None:
    at_limit = EPOCH + LATEST_ALLOWED_US * ONE_US  # now + 5 minutes, exactly
    (event,) = parse(
        [{"name": "n", "external_customer_id": "c", "timestamp": at_limit.isoformat()}]
    )
    assert event.timestamp_us == LATEST_ALLOWED_US
    past_limit = (at_limit + ONE_US).isoformat()
    errors = errors_of(
        {"events": [{"name": "n", "external_customer_id": "c", "timestamp": past_limit}]}
    )
    assert [e.loc for e in errors] == [("body", "events", 0, "timestamp")]


# --- Breakers: make exactly one valid event invalid in one specific way ----------------------
#
# A breaker mutates a (deep-copied) valid event in place and returns the loc, relative to
# ("body", "events", i), at which the validator must report the problem.

Breaker = Callable[[dict[str, Any], st.DataObject], Loc]

_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts(max_size=10)
)
_NON_STRINGS = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(texts(max_size=3), st.integers(), max_size=2),
)
_NON_OBJECTS = st.one_of(
    st.sampled_from([[], [1], "x", "", 0, 1.5, True]), st.lists(_JSON_LEAVES, max_size=3)
)


def _metadata_of(event: dict[str, Any], room_for: str) -> dict[str, Any]:
    """The event's metadata, made a dict with a free slot for `room_for`."""
    metadata = event.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    metadata.pop(room_for, None)
    while len(metadata) >= RULES.max_metadata_keys:
        metadata.pop(next(iter(metadata)))
    event["metadata"] = metadata
    return metadata


def _set_metadata(event: dict[str, Any], data: st.DataObject, value: Any) -> Loc:
    """Set one ordinary metadata key to `value`; returns its loc."""
    key = data.draw(metadata_keys(), label="metadata key")
    _metadata_of(event, key)[key] = value
    return ("metadata", key)


def _with_cost(event: dict[str, Any]) -> dict[str, Any]:
    cost = {"amount": "1.5", "currency": "usd"}
    _metadata_of(event, "_cost")["_cost"] = cost
    return cost


def _with_llm(event: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    llm = data.draw(llms(), label="_llm")
    _metadata_of(event, "_llm")["_llm"] = llm
    return llm


def _only_customer_id(event: dict[str, Any], value: Any) -> Loc:
    event.pop("external_customer_id", None)
    event["customer_id"] = value
    return ("customer_id",)


def _only_external_customer_id(event: dict[str, Any], value: Any) -> Loc:
    event.pop("customer_id", None)
    event["external_customer_id"] = value
    return ("external_customer_id",)


def _with_nul() -> st.SearchStrategy[str]:
    """A short string with a NUL byte somewhere."""
    return st.builds(lambda a, b: a + "\x00" + b, texts(max_size=20), texts(max_size=20))


@st.composite
def _not_a_uuid(draw: st.DrawFn) -> Any:
    value = draw(
        st.one_of(
            texts(max_size=40),
            st.sampled_from(["", "not-a-uuid", "123", "6ba7b810-9dad-11d1-80b4-00c04fd430c"]),
            st.integers(),
            st.booleans(),
        )
    )
    if isinstance(value, str):
        try:
            uuid.UUID(value)
        except ValueError:
            return value
        return "not-a-uuid"
    return value


@st.composite
def _unparsable_timestamps(draw: st.DrawFn) -> str:
    value = draw(
        st.one_of(
            st.sampled_from(
                [
                    "",
                    "yesterday",
                    "2024-13-01T00:00:00Z",
                    "2024-02-30T00:00:00+00:00",
                    "2024-01-01T25:00:00Z",
                    "2024-01-01T00:00:00+25:00",
                    "01/02/2024 10:00",
                    "2024-01-01T00:00:00 UTC",
                ]
            ),
            texts(max_size=30),
        )
    )
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return value
    return "yesterday"


@st.composite
def _future_timestamps(draw: st.DrawFn) -> str | int | float:
    """More than max_future after NOW, as an ISO string or epoch seconds."""
    moment_us = LATEST_ALLOWED_US + draw(st.integers(1, 10 * 365 * 86_400 * 1_000_000))
    form = draw(st.sampled_from(["iso", "int", "float"]))
    if form == "int":
        return -(-moment_us // 1_000_000)
    if form == "float":
        return moment_us / 1_000_000
    offset = draw(offsets())
    moment = (EPOCH + moment_us * ONE_US).astimezone(timezone(offset))
    return moment.replace(tzinfo=None).isoformat() + format_offset(offset)


@st.composite
def _too_many_places(draw: st.DrawFn) -> str | float:
    whole = draw(st.integers(0, 99_999))
    places = draw(st.integers(13, 20))
    fraction = draw(st.integers(0, 10 ** (places - 1) - 1)) * 10 + draw(st.integers(1, 9))
    text = f"{whole}.{fraction:0{places}d}"
    if draw(st.booleans()) and Decimal(repr(float(text))) == Decimal(text):
        return float(text)
    return text


@st.composite
def _too_many_whole_digits(draw: st.DrawFn) -> str | int | float:
    whole = draw(st.integers(100_000, 10**12))
    form = draw(st.sampled_from(["str", "int", "float", "fraction"]))
    if form == "int":
        return whole
    if form == "float":
        return float(whole)
    if form == "fraction":
        return f"{whole}.{draw(st.integers(0, 999))}"
    return str(whole)


def _break_cost_amount(strategy: st.SearchStrategy[Any]) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        _with_cost(event)["amount"] = data.draw(strategy, label="amount")
        return ("metadata", "_cost", "amount")

    return apply


def _break_currency(strategy: st.SearchStrategy[Any]) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        _with_cost(event)["currency"] = data.draw(strategy, label="currency")
        return ("metadata", "_cost", "currency")

    return apply


def _missing_cost_field(key: str) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        del _with_cost(event)[key]
        return ("metadata", "_cost", key)

    return apply


def _cost_not_object(event: dict[str, Any], data: st.DataObject) -> Loc:
    _metadata_of(event, "_cost")["_cost"] = data.draw(_NON_OBJECTS | st.none(), label="_cost")
    return ("metadata", "_cost")


def _cost_extra_key(event: dict[str, Any], data: st.DataObject) -> Loc:
    key = data.draw(texts(max_size=10).filter(lambda k: k not in {"amount", "currency"}))
    _with_cost(event)[key] = data.draw(_JSON_LEAVES)
    return ("metadata", "_cost", key)


def _break_tokens(strategy: st.SearchStrategy[Any]) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        llm = _with_llm(event, data)
        key = data.draw(
            st.sampled_from(
                ["input_tokens", "output_tokens", "total_tokens", "cached_input_tokens"]
            ),
            label="token field",
        )
        llm[key] = data.draw(strategy, label="tokens")
        return ("metadata", "_llm", key)

    return apply


def _llm_missing_total(event: dict[str, Any], data: st.DataObject) -> Loc:
    del _with_llm(event, data)["total_tokens"]
    return ("metadata", "_llm", "total_tokens")


def _llm_extra_key(event: dict[str, Any], data: st.DataObject) -> Loc:
    llm = _with_llm(event, data)
    allowed = {"vendor", "model", "prompt", "response", "cached_input_tokens"}
    allowed |= {"input_tokens", "output_tokens", "total_tokens"}
    key = data.draw(texts(max_size=12).filter(lambda k: k not in allowed), label="extra key")
    llm[key] = data.draw(_JSON_LEAVES)
    return ("metadata", "_llm", key)


def _too_many_metadata_keys(event: dict[str, Any], data: st.DataObject) -> Loc:
    count = data.draw(st.integers(RULES.max_metadata_keys + 1, RULES.max_metadata_keys + 10))
    event["metadata"] = {f"k{i}": i for i in range(count)}
    return ("metadata",)


def _bad_metadata_key(strategy: st.SearchStrategy[str]) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        key = data.draw(strategy, label="bad key")
        _metadata_of(event, key)[key] = data.draw(metadata_values())
        return ("metadata", key)

    return apply


def _bad_metadata_value(strategy: st.SearchStrategy[Any]) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        return _set_metadata(event, data, data.draw(strategy, label="bad value"))

    return apply


def _draw(strategy: st.SearchStrategy[Any], apply: Callable[[dict[str, Any], Any], Loc]) -> Breaker:
    """A breaker that draws a value from `strategy` and applies it with `apply(event, value)`."""
    return lambda event, data: apply(event, data.draw(strategy, label="value"))


def _field(key: str, strategy: st.SearchStrategy[Any]) -> Breaker:
    """A breaker that sets top-level `key` to a value drawn from `strategy`."""

    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        event[key] = data.draw(strategy, label=key)
        return (key,)

    return apply


def _delete(key: str) -> Breaker:
    def apply(event: dict[str, Any], data: st.DataObject) -> Loc:
        del event[key]
        return (key,)

    return apply


def _both_customers(event: dict[str, Any], data: st.DataObject) -> Loc:
    event["customer_id"] = str(data.draw(st.uuids(version=4)))
    event["external_customer_id"] = data.draw(texts(1, 20))
    return ("customer_id",)


def _no_customer(event: dict[str, Any], data: st.DataObject) -> Loc:
    for key in ("customer_id", "external_customer_id"):
        if data.draw(st.booleans()):
            event[key] = None
        else:
            event.pop(key, None)
    return ("customer_id",)


def _unknown_field(event: dict[str, Any], data: st.DataObject) -> Loc:
    key = data.draw(texts(max_size=15).filter(lambda k: k not in EVENT_FIELDS), label="field")
    event[key] = data.draw(_JSON_LEAVES, label="value")
    return (key,)


@dataclass(frozen=True)
class Rule:
    id: str
    breaker: Breaker


_TIMESTAMP = "timestamp"
_NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])
_KEY = st.text(KEY_TEXT, min_size=1, max_size=10)

RULE_TABLE = [
    # name
    Rule("name-missing", _delete("name")),
    Rule("name-too-long", _field("name", texts(RULES.max_name_length + 1, 200))),
    Rule("name-empty", _field("name", st.just(""))),
    Rule("name-not-string", _field("name", st.none() | _NON_STRINGS)),
    Rule("name-nul-byte", _field("name", _with_nul())),
    # customer
    Rule("customer-both", _both_customers),
    Rule("customer-neither", _no_customer),
    Rule("customer-id-not-uuid", _draw(_not_a_uuid(), _only_customer_id)),
    Rule(
        "customer-id-not-v4",
        _draw(
            st.sampled_from([1, 3, 5]).flatmap(lambda v: st.uuids(version=v)).map(str),
            _only_customer_id,
        ),
    ),
    Rule("external-customer-id-empty", _draw(st.just(""), _only_external_customer_id)),
    Rule("external-customer-id-not-string", _draw(_NON_STRINGS, _only_external_customer_id)),
    Rule("external-customer-id-nul", _draw(_with_nul(), _only_external_customer_id)),
    # other top-level fields
    Rule("external-id-empty", _field("external_id", st.just(""))),
    Rule("parent-id-not-string", _field("parent_id", _NON_STRINGS)),
    Rule("external-member-id-too-long", _field("external_member_id", st.just("m" * 513))),
    Rule("unknown-field", _unknown_field),
    Rule("organization-id-set", _field("organization_id", st.uuids().map(str) | texts(1, 10))),
    Rule("member-id-set", _field("member_id", st.uuids().map(str) | texts(1, 10))),
    # timestamp
    Rule(
        "timestamp-naive",
        _field(
            _TIMESTAMP, st.datetimes(max_value=LATEST.replace(tzinfo=None)).map(datetime.isoformat)
        ),
    ),
    Rule("timestamp-unparsable", _field(_TIMESTAMP, _unparsable_timestamps())),
    Rule(
        "timestamp-date-only",
        _field(_TIMESTAMP, st.dates(max_value=date(2024, 12, 31)).map(date.isoformat)),
    ),
    Rule("timestamp-future", _field(_TIMESTAMP, _future_timestamps())),
    Rule("timestamp-nan-inf", _field(_TIMESTAMP, _NAN_INF)),
    Rule("timestamp-bool", _field(_TIMESTAMP, st.booleans())),
    Rule("timestamp-not-scalar", _field(_TIMESTAMP, st.just([]) | st.just({}))),
    # metadata container and keys
    Rule("metadata-not-object", _field("metadata", _NON_OBJECTS)),
    Rule("metadata-too-many-keys", _too_many_metadata_keys),
    Rule(
        "metadata-key-too-long",
        _bad_metadata_key(
            st.text(KEY_TEXT, min_size=RULES.max_metadata_key_length + 1, max_size=60)
        ),
    ),
    Rule(
        "metadata-key-dot",
        _bad_metadata_key(
            st.builds(lambda a, b: f"{a}.{b}", texts(max_size=19), texts(max_size=19))
        ),
    ),
    Rule("metadata-key-empty", _bad_metadata_key(st.just(""))),
    Rule(
        "metadata-key-nul",
        _bad_metadata_key(st.builds(lambda a, b: f"{a}\x00{b}", _KEY, _KEY)),
    ),
    # metadata values
    Rule("metadata-value-null", _bad_metadata_value(st.none())),
    Rule("metadata-value-list", _bad_metadata_value(st.lists(metadata_values(), max_size=3))),
    Rule(
        "metadata-value-object",
        _bad_metadata_value(st.dictionaries(_KEY, metadata_values(), max_size=3)),
    ),
    Rule("metadata-value-empty-string", _bad_metadata_value(st.just(""))),
    Rule(
        "metadata-value-too-long",
        _bad_metadata_value(
            st.integers(RULES.max_metadata_string_length + 1, 1000).map(lambda n: "v" * n)
        ),
    ),
    Rule("metadata-value-nan-inf", _bad_metadata_value(_NAN_INF)),
    Rule(
        "metadata-value-beyond-int64",
        _bad_metadata_value(
            st.integers(2**63, 2**64 - 1)
            | st.integers(-(2**64), -(2**63) - 1)
            | st.floats(2.0**63, allow_infinity=False)
            | st.floats(max_value=-(2.0**63) * 1.0000001, allow_infinity=False)
        ),
    ),
    Rule("metadata-value-nul", _bad_metadata_value(_with_nul())),
    # _cost
    Rule("cost-not-object", _cost_not_object),
    Rule("cost-amount-13-places", _break_cost_amount(_too_many_places())),
    Rule("cost-amount-6-whole-digits", _break_cost_amount(_too_many_whole_digits())),
    Rule(
        "cost-amount-not-numeric",
        _break_cost_amount(
            st.sampled_from(["", "abc", "1,5", "12.5.1", "$1", "one", "0x10", "1e"])
            | st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz"), min_size=1, max_size=8)
        ),
    ),
    Rule(
        "cost-amount-nan-inf",
        _break_cost_amount(st.sampled_from(["NaN", "nan", "sNaN", "Infinity", "-inf"])),
    ),
    Rule("cost-amount-bool", _break_cost_amount(st.booleans())),
    Rule("cost-amount-not-scalar", _break_cost_amount(st.sampled_from([[], {}, None]))),
    Rule("cost-amount-missing", _missing_cost_field("amount")),
    Rule(
        "cost-currency-not-usd",
        _break_currency(st.sampled_from(["USD", "Usd", "xusdx", "eur", "", " usd"]) | _NON_STRINGS),
    ),
    Rule("cost-currency-missing", _missing_cost_field("currency")),
    Rule("cost-extra-key", _cost_extra_key),
    # _llm
    Rule("llm-missing-total-tokens", _llm_missing_total),
    Rule("llm-tokens-not-int", _break_tokens(st.sampled_from([1.5, "3", True, False]))),
    Rule("llm-tokens-negative", _break_tokens(st.integers(max_value=-1))),
    Rule("llm-tokens-beyond-int64", _break_tokens(st.integers(2**63, 2**64 - 1))),
    Rule("llm-extra-key", _llm_extra_key),
]


def _assert_only(errors: list[FieldError], index: int, loc: Loc) -> None:
    locs = [error.loc for error in errors]
    assert loc in locs, f"expected an error at {loc}, got {errors}"
    strays = [error for error in errors if error.loc[:3] != ("body", "events", index)]
    assert not strays, f"errors reported outside event {index}: {strays}"


@pytest.mark.parametrize("rule", RULE_TABLE, ids=lambda rule: rule.id)
@given(data=st.data())
def test_one_broken_event_is_reported_at_its_loc(rule: Rule, data: st.DataObject) -> None:
    batch = copy.deepcopy(data.draw(batches(min_size=1, max_size=5), label="batch"))
    index = data.draw(st.integers(0, len(batch) - 1), label="index")
    relative = rule.breaker(batch[index], data)
    errors = errors_of({"events": batch})
    _assert_only(errors, index, ("body", "events", index, *relative))


@given(data=st.data())
def test_every_broken_event_is_reported(data: st.DataObject) -> None:
    """All-or-nothing: every broken event of the batch is reported, not just the first."""
    batch = copy.deepcopy(data.draw(batches(min_size=2, max_size=8), label="batch"))
    broken = data.draw(
        st.sets(st.integers(0, len(batch) - 1), min_size=2, max_size=len(batch)), label="broken"
    )
    expected = {}
    for index in sorted(broken):
        rule = data.draw(st.sampled_from(RULE_TABLE), label=f"rule for {index}")
        expected[index] = ("body", "events", index, *rule.breaker(batch[index], data))
    errors = errors_of({"events": batch})
    locs = {error.loc for error in errors}
    assert set(expected.values()) <= locs
    assert {error.loc[2] for error in errors} == broken


def test_errors_are_capped() -> None:
    batch = [{"name": "", "external_customer_id": "c"}] * (MAX_ERRORS + 10)
    errors = errors_of({"events": batch})
    assert len(errors) == MAX_ERRORS


# --- Body shapes -----------------------------------------------------------------------------


@given(st.one_of(_JSON_LEAVES, st.lists(_JSON_LEAVES, max_size=3)))
def test_body_must_be_an_object(body: Any) -> None:
    assert [e.loc for e in errors_of(body)] == [("body",)]


@given(st.dictionaries(texts(max_size=10).filter(lambda k: k != "events"), _JSON_LEAVES))
def test_body_needs_events(body: dict[str, Any]) -> None:
    errors = errors_of(body)
    assert [(e.type, e.loc) for e in errors] == [
        *(("extra_forbidden", ("body", key)) for key in body),
        ("missing", ("body", "events")),
    ]


@given(
    st.dictionaries(texts(max_size=10).filter(lambda k: k != "events"), _JSON_LEAVES, min_size=1)
)
def test_unknown_body_fields_are_rejected(extra: dict[str, Any]) -> None:
    errors = errors_of({"events": [], **extra})
    assert [(e.type, e.loc) for e in errors] == [
        ("extra_forbidden", ("body", key)) for key in extra
    ]


def test_numbers_at_the_edges_of_the_int64_range() -> None:
    edges = {"a": 2**63 - 1, "b": -(2**63), "c": 9.2e18, "d": -9.2e18, "e": 1e-300}
    (event,) = parse([{"name": "n", "external_customer_id": "c", "metadata": edges}])
    assert event.metadata == edges
    too_big = {"v": 1.7976931348623157e308, "w": 2**63, "x": -(2**63) - 1, "y": 9.3e18}
    errors = errors_of(
        {"events": [{"name": "n", "external_customer_id": "c", "metadata": too_big}]}
    )
    assert [(e.type, e.loc[-1]) for e in errors] == [("number_range", k) for k in too_big]


@given(_JSON_LEAVES | st.dictionaries(texts(max_size=5), _JSON_LEAVES, max_size=2))
def test_events_must_be_a_list(events: Any) -> None:
    errors = errors_of({"events": events})
    assert [(e.type, e.loc) for e in errors] == [("list_type", ("body", "events"))]


@given(data=st.data())
def test_an_event_must_be_an_object(data: st.DataObject) -> None:
    batch = copy.deepcopy(data.draw(batches(min_size=1, max_size=5), label="batch"))
    index = data.draw(st.integers(0, len(batch) - 1), label="index")
    batch[index] = data.draw(_NON_OBJECTS | st.none() | st.integers(), label="not an object")
    errors = errors_of({"events": batch})
    assert [e.loc for e in errors] == [("body", "events", index)]


# --- _cost.amount examples (Polar's documentation cases) ------------------------------------


def _cost_event(amount: Any) -> dict[str, Any]:
    return {
        "name": "llm",
        "external_customer_id": "c",
        "metadata": {"_cost": {"amount": amount, "currency": "usd"}},
    }


@pytest.mark.parametrize(
    ("amount", "canonical"),
    [
        (1e-12, "0.000000000001"),
        ("1e-12", "0.000000000001"),
        ("12.5", "12.5"),
        (12.5, "12.5"),
        (12, "12"),
        ("0.100000000000000", "0.1"),
        ("99999.999999999999", "99999.999999999999"),
        ("0", "0"),
        (0.0, "0"),
        ("-0.0", "0"),
        ("0E-20", "0"),
        ("1E+2", "100"),
    ],
)
def test_cost_amount_accepted(amount: Any, canonical: str) -> None:
    (event,) = parse([_cost_event(amount)])
    assert event.cost_amount == canonical
    assert event.metadata["_cost"] == {"amount": canonical, "currency": "usd"}


@pytest.mark.parametrize(
    ("amount", "error_type"),
    [
        ("0.0000000000001", "decimal_max_places"),
        (0.0000000000001, "decimal_max_places"),
        (123456, "decimal_whole_digits"),
        ("123456", "decimal_whole_digits"),
        (100000.0, "decimal_whole_digits"),
        (0.1 + 0.2, "decimal_max_places"),  # 0.30000000000000004
        ("NaN", "finite_number"),
        (True, "decimal_type"),
        ([1], "decimal_type"),
    ],
)
def test_cost_amount_rejected(amount: Any, error_type: str) -> None:
    errors = errors_of({"events": [_cost_event(amount)]})
    assert [(e.type, e.loc) for e in errors] == [
        (error_type, ("body", "events", 0, "metadata", "_cost", "amount"))
    ]


# --- Regressions: amounts that Decimal would round, overflow on, or read in other scripts -----


@pytest.mark.parametrize(
    "amount",
    [
        # 28 decimal places: Decimal.normalize() rounds to the 28-digit context precision,
        # so these come out as "1" and "12345" instead of being rejected.
        "1.0000000000000000000000000001",
        "12345.0000000000000000000000001",
        "0.1000000000000000000000000000001",
        # Rounds *up* to 100000 and is reported as too many whole digits instead.
        "99999.9999999999999999999999999",
        # Below the context's smallest exponent: normalize() underflows to 0, accepted as "0".
        "1e-1000030",
    ],
)
def test_cost_amount_beyond_28_digits_is_rejected_not_rounded(amount: str) -> None:
    errors = errors_of({"events": [_cost_event(amount)]})
    assert [(e.type, e.loc) for e in errors] == [
        ("decimal_max_places", ("body", "events", 0, "metadata", "_cost", "amount"))
    ]


@pytest.mark.parametrize("amount", ["1e1000000", "-1E+1000000", "1e999999999"])
def test_cost_amount_huge_exponent_is_a_field_error(amount: str) -> None:
    """Once a decimal.Overflow escaped here: a 500 instead of a 422."""
    errors = errors_of({"events": [_cost_event(amount)]})
    assert [e.loc for e in errors] == [("body", "events", 0, "metadata", "_cost", "amount")]


# Other scripts' decimal digits: Decimal() reads them, so they are either rejected or, once
# accepted, must come out as the canonical ASCII string like any other amount.
_FOREIGN_DIGITS = ["\u0660", "\u06f0", "\u0966", "\uff10"]  # Arabic-Indic, Persian, ...


def _in_script(text: str, zero: str) -> str:
    return "".join(chr(ord(zero) + int(c)) if c.isdigit() else c for c in text)


@pytest.mark.parametrize(
    ("amount", "value"),
    [
        ("\u0661\u0662", Decimal(12)),  # Arabic-Indic "12"
        ("\uff11\uff12.\uff15", Decimal("12.5")),  # fullwidth "12.5"
        ("\u0660", Decimal(0)),
        ("\u0966.\u0967", Decimal("0.1")),  # Devanagari "0.1"
    ],
)
def test_cost_amount_in_foreign_digits_is_canonical_or_rejected(
    amount: str, value: Decimal
) -> None:
    """The fast path once matched any Unicode digit with `\\d` and kept the input as is."""
    errors: list[FieldError] = []
    events: list[Event] = []
    try:
        events = parse([_cost_event(amount)])
    except ValidationFailed as exc:
        errors = exc.errors
    if errors:  # rejecting them is fine too
        assert [e.loc for e in errors] == [("body", "events", 0, "metadata", "_cost", "amount")]
        return
    (event,) = events
    assert event.cost_amount is not None
    assert _CANONICAL_DECIMAL.fullmatch(event.cost_amount), event.cost_amount
    assert Decimal(event.cost_amount) == value
