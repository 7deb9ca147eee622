"""The compiled validator: the common case decided in C, straight into columns.

msgspec decodes the body into typed structs whose constraints are the rules (lengths, types,
unknown fields, number ranges), so most checks cost nothing beyond parsing. What structs cannot
say is checked on whole columns at once (timestamps, the customer id's form, one customer id
per event). Only `_cost` and `_llm` are looked at event by event.

It answers "valid, and these are the columns" or "not sure" (None): the exact validator
(`exact.py`) then decides, with every error located. For valid input both produce the same
columns; spellings only the exact one normalizes (epoch timestamps, upper-case UUIDs, padded
amounts) are "not sure" here. A property test holds the two to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cache
from itertools import chain
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from msgspec import Meta, Struct
from msgspec.structs import astuple

from meters.events import priced
from meters.events.schema import (
    CANONICAL_UUID4,
    COLUMNS,
    COST_KEY,
    EVENT_FIELDS,
    ID_FIELDS,
    LLM_KEY,
    NUMBER_LIMIT,
    PRICE_TABLE,
    TIMESTAMP,
)
from meters.events.usage import LLM_STRING_LENGTH
from meters.pricing import Pricing
from meters.settings import EventRules
from meters.times import MAX_TS_US, MIN_TS_US, ONE_US

# The one spelling of each the compiled path reads; others go to the exact validator.
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_ISO_TIME = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)
_INT = Annotated[int, Meta(ge=-NUMBER_LIMIT, le=NUMBER_LIMIT - 1)]
_FLOAT = Annotated[float, Meta(ge=-float(NUMBER_LIMIT), lt=float(NUMBER_LIMIT))]
_TOKENS = Annotated[int, Meta(ge=0, le=NUMBER_LIMIT - 1)]
_LLM_STRING = Annotated[str, Meta(min_length=1, max_length=LLM_STRING_LENGTH)]


class _Usage(Struct, forbid_unknown_fields=True, gc=False):
    """A `_cost` or `_llm` value (one struct: a union may hold only one object type); which
    fields are set must match the key. None = absent: an explicit null is refused by the
    types wherever the exact validator refuses it (all but prompt, response and cached)."""

    amount: str | int | float = None  # type: ignore[assignment]
    currency: str = None  # type: ignore[assignment]
    vendor: _LLM_STRING = None  # type: ignore[assignment]
    model: _LLM_STRING = None  # type: ignore[assignment]
    prompt: str | None = None
    response: str | None = None
    input_tokens: _TOKENS = None  # type: ignore[assignment]
    output_tokens: _TOKENS = None  # type: ignore[assignment]
    total_tokens: _TOKENS = None  # type: ignore[assignment]
    cached_input_tokens: _TOKENS | None = None


# astuple() positions: a cost sets only the first two, an LLM call none of them.
_COST_ONLY = (None,) * 8
_NO_COST = (None, None)


class _Cost(Struct, gc=False):
    """A `_cost` as stored (encoded as the exact validator's dict is)."""

    amount: str
    currency: str


class _Llm(Struct, omit_defaults=True, gc=False):
    """An `_llm` as stored: every field but cached_input_tokens always written, in `_Usage`'s
    order (so that `_Llm(*astuple(usage)[2:])` builds it)."""

    vendor: str
    model: str
    prompt: str | None
    response: str | None
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int | None = None


_EMPTY: dict[str, Any] = {}
_ENCODE_LINES = msgspec.json.Encoder().encode_lines
# The amounts whose canonical spelling `_canonical_amounts` computes (others: "not sure").
_PLAIN_AMOUNT = r"^-?[0-9]{1,5}(\.[0-9]{0,12})?$"


class Validate(Protocol):
    """Body bytes and now (UTC µs) -> columns or None; with `pricing`, the `_llm` events
    without `_cost` priced (`priced.price`), what was not counted into `unpriced`."""

    def __call__(
        self,
        data: bytes,
        now: int,
        pricing: Pricing | None = None,
        unpriced: Counter[str] | None = None,
    ) -> pa.Table | None: ...


# Record values, their Kafka timestamps (ms) and now -> columns plus organization_id and
# ingested_at, or None.
ValidateRecords = Callable[[list[bytes], list[int], int], pa.Table | None]


def _event_struct(rules: EventRules, *, record: bool) -> Any:
    """The struct an event (`record`: a JSON Kafka record) decodes into. Built with defstruct:
    the limits come from `rules`, and a class body inside a function would leave its
    annotations unresolvable (postponed evaluation)."""
    key = Annotated[str, Meta(min_length=1, max_length=rules.max_metadata_key_length)]
    text = Annotated[str, Meta(min_length=1, max_length=rules.max_metadata_string_length)]
    metadata = Annotated[
        dict[key, text | bool | _INT | _FLOAT | _Usage],
        Meta(max_length=rules.max_metadata_keys),
    ]
    identifier = Annotated[str, Meta(min_length=1, max_length=rules.max_id_length)]
    short = Annotated[str, Meta(max_length=40)]
    organization = ("organization_id", short) if record else ("organization_id", None, None)
    fields: list[Any] = [
        ("name", Annotated[str, Meta(min_length=1, max_length=rules.max_name_length)]),
        organization,
        ("timestamp", short | None, None),
        ("customer_id", short | None, None),
        *((field, identifier | None, None) for field in ID_FIELDS),
        ("metadata", metadata | None, None),
        ("member_id", None, None),
    ]
    assert {field[0] for field in fields} == EVENT_FIELDS
    if record:
        fields.append(("ingested_at", short | None, None))
    return msgspec.defstruct(
        "Record" if record else "Event",
        fields,
        forbid_unknown_fields=True,
        gc=False,  # no cycles; untracked structs keep large bodies from triggering collections
    )


@cache
def validator(rules: EventRules) -> Validate:
    """The compiled validator for `rules`: body bytes and now (UTC µs) -> columns or None."""
    event = _event_struct(rules, record=False)
    body = msgspec.defstruct(
        "Body",
        [("events", list[event])],  # type: ignore[valid-type]
        forbid_unknown_fields=True,
    )
    decode: Callable[[bytes], Any] = msgspec.json.Decoder(body).decode
    future_us = rules.max_future // ONE_US

    def validate(
        data: bytes,
        now: int,
        pricing: Pricing | None = None,
        unpriced: Counter[str] | None = None,
    ) -> pa.Table | None:
        # Every NUL in JSON text is escaped: one look at the body replaces a check per string.
        if b"\\u0000" in data:
            return None
        try:
            events: list[Any] = decode(data).events
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        latest = min(now + future_us, MAX_TS_US)
        return _columns(events, pa.scalar(now, TIMESTAMP), latest, pricing, unpriced)

    return validate


@cache
def record_validator(rules: EventRules) -> ValidateRecords:
    """The compiled validator of JSON records (`meters.records`): the same rules, plus a
    canonical organization_id and an optional ingested_at (default: the record's time)."""
    decode = msgspec.json.Decoder(_event_struct(rules, record=True)).decode
    future_us = rules.max_future // ONE_US

    def validate(values: list[bytes], timestamps_ms: list[int], now: int) -> pa.Table | None:
        if any(b"\\u0000" in value for value in values):
            return None
        try:
            events = [decode(value) for value in values]
        except (msgspec.ValidationError, msgspec.DecodeError, TypeError):
            return None
        string = pa.string()
        organizations = pa.array([e.organization_id for e in events], string)
        if not pc.all(pc.match_substring_regex(organizations, _UUID)).as_py():
            return None
        sent = pc.multiply(pa.array(timestamps_ms, pa.int64()), 1000).cast(TIMESTAMP)
        ingested = _timestamps(pa.array([e.ingested_at for e in events], string), sent, MAX_TS_US)
        if ingested is None:
            return None
        table = _columns(events, ingested, min(now + future_us, MAX_TS_US))
        if table is None:
            return None
        return table.append_column("organization_id", organizations).append_column(
            "ingested_at", ingested
        )

    return validate


def _columns(
    events: list[Any],
    default_time: pa.Scalar[Any] | pa.Array[Any],
    latest: int,
    pricing: Pricing | None = None,
    unpriced: Counter[str] | None = None,
) -> pa.Table | None:
    """The events' columns, timestamps defaulting to `default_time`; None if not sure."""
    string = pa.string()
    customer = pa.array([e.customer_id for e in events], string)
    external_customer = pa.array([e.external_customer_id for e in events], string)
    # Exactly one of the two customer ids, and customer_id in its canonical form.
    if pc.any(pc.equal(customer.is_null(), external_customer.is_null())).as_py():
        return None
    if (
        customer.null_count < len(customer)
        and not pc.all(pc.match_substring_regex(customer, CANONICAL_UUID4)).as_py()
    ):
        return None
    timestamp = _timestamps(pa.array([e.timestamp for e in events], string), default_time, latest)
    if timestamp is None:
        return None
    metadatas = [e.metadata or _EMPTY for e in events]
    present = [m for m in metadatas if m]
    # Keys with a '.' (meter paths split on it): one scan of all keys, not one per key.
    keys = "".join(chain.from_iterable(present))
    if "." in keys:
        return None
    # Objects (decoded as _Usage) are allowed under _cost and _llm only: count them all at once.
    objects = list(map(type, chain.from_iterable(map(dict.values, present)))).count(_Usage)
    with_cost: list[int] = []
    amounts: list[str] = []
    candidates = None if pricing is None else priced.Candidates()
    for i, metadata in enumerate(metadatas):
        if not metadata:
            continue
        if (cost := metadata.get(COST_KEY)) is not None:
            if type(cost) is not _Usage:
                return None
            fields = astuple(cost)
            if fields[1] != "usd" or fields[2:] != _COST_ONLY:
                return None
            amount = fields[0]
            amounts.append(amount if type(amount) is str else repr(amount))
            with_cost.append(i)
        if (value := metadata.get(LLM_KEY)) is not None:
            if type(value) is not _Usage:
                return None
            fields = astuple(value)
            if (
                fields[:2] != _NO_COST
                or fields[2] is None
                or fields[3] is None
                or fields[6] is None
                or fields[7] is None
                or fields[8] is None
            ):
                return None
            metadata[LLM_KEY] = _Llm(*fields[2:])
            objects -= 1
            if candidates is not None and cost is None:
                candidates.rows.append(i)
                candidates.calls.append(fields)
    costs: list[str | None] = [None] * len(events)
    if with_cost:
        canonical = _canonical_amounts(amounts)
        if canonical is None:
            return None
        for i, amount in zip(with_cost, canonical, strict=True):
            metadatas[i][COST_KEY] = _Cost(amount, "usd")
            costs[i] = amount
        objects -= len(with_cost)
    if objects:
        return None
    found = None
    if candidates is not None and pricing is not None:
        found = candidates.price(timestamp.to_numpy().view(np.int64), pricing)
        if PRICE_TABLE in keys:  # perhaps a given one, which pricing replaces
            for row in found.rows:
                metadatas[row].pop(PRICE_TABLE, None)
        if unpriced is not None:
            unpriced.update(found.unpriced)
    # One encoder call for every event; JSON text holds no raw newline, so the lines are the
    # events' metadata.
    texts = _ENCODE_LINES(metadatas).split(b"\n")[:-1]
    metadata = pa.array(texts, string)  # bytes: msgspec writes UTF-8
    cost = pa.array(costs, string)
    if found is not None:
        metadata, cost = found.into(metadata, cost)
    return pa.Table.from_arrays(
        [
            pa.array([e.name for e in events], string),
            timestamp,
            customer,
            external_customer,
            pa.array([e.external_id for e in events], string),
            pa.array([e.parent_id for e in events], string),
            pa.array([e.external_member_id for e in events], string),
            metadata,
            cost,
        ],
        schema=COLUMNS,
    )


def _timestamps(
    values: pa.Array[Any], default: pa.Scalar[Any] | pa.Array[Any], latest: int
) -> pa.Array[Any] | None:
    """ISO 8601 timestamps with an offset as UTC microseconds (absent: `default`), or None if
    one is spelled otherwise or lies outside [year 1, latest]."""
    if (
        values.null_count < len(values)
        and not pc.all(pc.match_substring_regex(values, _ISO_TIME)).as_py()
    ):
        return None
    try:
        parsed = pc.cast(values, TIMESTAMP)
    except pa.ArrowInvalid:  # no such date, an offset of 24 h or more, ...
        return None
    moments: pa.Array[Any] = pc.coalesce(parsed, default)  # type: ignore[arg-type]
    low, high = pc.min_max(moments).values()  # timestamp scalars: .value is µs
    if len(moments) and (low.value < MIN_TS_US or high.value > latest):  # type: ignore[attr-defined]
        return None
    return moments


def _canonical_amounts(amounts: list[str]) -> list[str] | None:
    """Plain decimal amounts as `meters.events.usage.parse_cost_amount` spells them (no
    needless zeros, no "-0"), or None if one is not plain. Trims, not regex replacements:
    those cost 0.3 µs per value each."""
    compute: Any = pc  # the stubs' overloads do not cover these string kernels
    given = pa.array(amounts, pa.string())
    if not compute.all(compute.match_substring_regex(given, _PLAIN_AMOUNT)).as_py():
        return None
    negative = compute.starts_with(given, "-")
    unsigned = compute.utf8_ltrim(given, "-")
    trimmed = compute.if_else(
        compute.match_substring(unsigned, "."),
        compute.utf8_rtrim(compute.utf8_rtrim(unsigned, "0"), "."),
        unsigned,
    )
    digits = compute.utf8_ltrim(trimmed, "0")
    digits = compute.if_else(
        compute.or_(compute.equal(digits, ""), compute.starts_with(digits, ".")),
        compute.binary_join_element_wise("0", digits, ""),
        digits,
    )
    signed = compute.if_else(
        compute.and_(negative, compute.not_equal(digits, "0")),
        compute.binary_join_element_wise("-", digits, ""),
        digits,
    )
    canonical: list[str] = signed.to_pylist()
    return canonical
