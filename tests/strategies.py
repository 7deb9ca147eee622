"""Hypothesis strategies shared by the test suite.

Every event drawn from `valid_events()` passes `meters.events.parse_ingest_body` with the default
`EventRules` for any `now` at or after `LATEST` (timestamps are always in the past).
Events are plain JSON-shaped dicts, exactly what a client would send.

The functions returning strategies are cached: hypothesis validates a strategy object the first
time it draws from it, which costs more than drawing, so each is built once.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
# Generated timestamps lie in [EARLIEST, LATEST]: in the past for any test whose `now` is later.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2024, 12, 31, tzinfo=UTC)
# A fixed "now" for tests: comfortably after LATEST.
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NOW_US = (NOW - EPOCH) // ONE_US

MAX_NAME_LENGTH = 128
MAX_ID_LENGTH = 512
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_STRING_LENGTH = 500
RESERVED_METADATA_KEYS = frozenset({"_cost", "_llm"})


def examples(count: int) -> int:
    """A test's example count, `count` being its count under the `ci` profile (50 a test by
    default, `tests/conftest.py`), in proportion under the profile loaded: a fifth under
    `fast` (`make test-fast`), forty times as many under `nightly`."""
    return max(1, round(count * settings.default.max_examples / 50))


# Any text JSON can carry (no lone surrogates) minus NUL, which the validator rejects.
TEXT = st.characters(codec="utf-8", exclude_characters="\x00")
# Metadata keys: meter paths split on '.', so keys never contain one.
KEY_TEXT = st.characters(codec="utf-8", exclude_characters="\x00.")

# Offsets real clients send, plus any whole-minute offset within ±14h.
_COMMON_OFFSETS = [
    timedelta(0),
    timedelta(hours=5, minutes=30),
    timedelta(hours=-4),
    timedelta(hours=5, minutes=45),
    timedelta(hours=-3, minutes=-30),
    timedelta(hours=14),
    timedelta(hours=-12),
    timedelta(hours=9),
]


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    return (moment - EPOCH) // ONE_US


@functools.cache
def texts(min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
    return st.text(TEXT, min_size=min_size, max_size=max_size)


@functools.cache
def names() -> st.SearchStrategy[str]:
    return texts(1, MAX_NAME_LENGTH)


@functools.cache
def customer_ids() -> st.SearchStrategy[str]:
    return st.uuids(version=4).map(str)


@functools.cache
def ids() -> st.SearchStrategy[str]:
    """external_customer_id, external_id, parent_id, external_member_id."""
    return texts(1, MAX_ID_LENGTH)


@functools.cache
def offsets() -> st.SearchStrategy[timedelta]:
    return st.one_of(
        st.sampled_from(_COMMON_OFFSETS),
        st.integers(-14 * 60, 14 * 60).map(lambda minutes: timedelta(minutes=minutes)),
    )


def format_offset(offset: timedelta, *, zulu: bool = True) -> str:
    if offset == timedelta(0) and zulu:
        return "Z"
    sign = "-" if offset < timedelta(0) else "+"
    hours, minutes = divmod(abs(offset) // timedelta(minutes=1), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


@functools.cache
def _local_datetimes(
    earliest: datetime, latest: datetime, offset: timedelta
) -> st.SearchStrategy[datetime]:
    zone = timezone(offset)
    return st.datetimes(
        min_value=earliest.astimezone(zone).replace(tzinfo=None),
        max_value=latest.astimezone(zone).replace(tzinfo=None),
    )


@st.composite
def iso_timestamps(
    draw: st.DrawFn, earliest: datetime = EARLIEST, latest: datetime = LATEST
) -> str:
    """ISO-8601 strings with an offset (``Z``, ``+05:30``, ``-04:00``...) within the bounds."""
    offset = draw(offsets())
    local = draw(_local_datetimes(earliest, latest, offset))
    sep = draw(st.sampled_from(["T", " "]))
    date = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    hh_mm = f"{local.hour:02d}:{local.minute:02d}"
    hh_mm_ss = f"{hh_mm}:{local.second:02d}"
    forms = [f"{hh_mm_ss}.{local.microsecond:06d}"]
    if local.microsecond % 1000 == 0:
        forms.append(f"{hh_mm_ss}.{local.microsecond // 1000:03d}")
    if local.microsecond == 0:
        forms.append(hh_mm_ss)
        if local.second == 0:
            forms.append(hh_mm)
    time = draw(st.sampled_from(forms))
    return f"{date}{sep}{time}{format_offset(offset, zulu=draw(st.booleans()))}"


@functools.cache
def epoch_seconds(
    earliest: datetime = EARLIEST, latest: datetime = LATEST
) -> st.SearchStrategy[int | float]:
    """Epoch seconds: ints, or floats that are a whole number of microseconds."""
    low_us, high_us = to_us(earliest), to_us(latest)
    ints = st.integers(-(-low_us // 1_000_000), high_us // 1_000_000)
    floats = st.integers(low_us, high_us).map(lambda us: us / 1_000_000)
    return st.one_of(ints, floats)


@functools.cache
def timestamps(
    earliest: datetime = EARLIEST, latest: datetime = LATEST
) -> st.SearchStrategy[str | int | float]:
    return st.one_of(iso_timestamps(earliest, latest), epoch_seconds(earliest, latest))


@functools.cache
def metadata_keys() -> st.SearchStrategy[str]:
    return st.text(KEY_TEXT, min_size=1, max_size=MAX_METADATA_KEY_LENGTH).filter(
        lambda key: key not in RESERVED_METADATA_KEYS
    )


@functools.cache
def metadata_values() -> st.SearchStrategy[str | int | float | bool]:
    return st.one_of(
        texts(1, MAX_METADATA_STRING_LENGTH),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(-(2.0**63), 2.0**63, exclude_max=True),
        st.booleans(),
    )


@st.composite
def cost_amounts(draw: st.DrawFn) -> str | int | float:
    """A `_cost.amount`: ≤5 integer digits, ≤12 decimal places, as a string, int or float.

    Strings may carry trailing zeros beyond the 12th place ("0.100000000000000") or use
    exponent notation ("1.5E-7"); floats are only drawn when their shortest repr (what a JSON
    client writes) is exactly the intended decimal.
    """
    whole = draw(st.integers(0, 99_999))
    places = draw(st.integers(0, 12))
    text = str(whole)
    if places:
        text += "." + str(draw(st.integers(0, 10**places - 1))).zfill(places)
    value = Decimal(text)
    form = draw(st.sampled_from(["plain", "padded", "exponent", "int", "float"]))
    if form == "padded":
        padded = text if "." in text else text + "."
        return padded + "0" * draw(st.integers(1, 8))
    if form == "exponent":
        return draw(st.sampled_from([str(value.normalize()), f"{value.normalize():E}"]))
    if form == "int" and value == value.to_integral_value():
        return int(value)
    if form == "float" and Decimal(repr(float(value))) == value:
        return float(value)
    return format(value, "f")


@functools.cache
def costs() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"amount": cost_amounts(), "currency": st.just("usd")})


_TOKENS = st.integers(0, 10**7)


@st.composite
def llms(draw: st.DrawFn) -> dict[str, Any]:
    tokens = _TOKENS
    input_tokens, output_tokens = draw(tokens), draw(tokens)
    llm: dict[str, Any] = {
        "vendor": draw(texts(1, 40)),
        "model": draw(texts(1, 40)),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    if draw(st.booleans()):
        llm["cached_input_tokens"] = draw(st.integers(0, input_tokens))
    for key in ("prompt", "response"):
        if draw(st.booleans()):
            llm[key] = draw(texts(0, 200))
    return llm


@functools.cache
def _plain_metadata(max_size: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(metadata_keys(), metadata_values(), max_size=max_size)


@st.composite
def metadata(draw: st.DrawFn, max_keys: int = MAX_METADATA_KEYS) -> dict[str, Any]:
    """Up to `max_keys` keys, `_cost` and `_llm` (each optional) at random positions."""
    special: dict[str, Any] = {}
    if draw(st.booleans()):
        special["_cost"] = draw(costs())
    if draw(st.booleans()):
        special["_llm"] = draw(llms())
    plain = draw(_plain_metadata(max_keys - len(special)))
    items = list(plain.items())
    for key, value in special.items():
        items.insert(draw(st.integers(0, len(items))), (key, value))
    return dict(items)


@functools.cache
def valid_events(
    stamps: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Random valid ingest events (JSON-shaped dicts).

    Exactly one of customer_id / external_customer_id is set (the other absent or null);
    optional fields are absent, null or valid; a missing timestamp means "now".
    `stamps` replaces the default `timestamps()` (e.g. to keep events within a window).
    """
    stamps = timestamps() if stamps is None else stamps
    customer = st.one_of(
        st.fixed_dictionaries(
            {"customer_id": customer_ids()}, optional={"external_customer_id": st.none()}
        ),
        st.fixed_dictionaries({"external_customer_id": ids()}, optional={"customer_id": st.none()}),
    )
    rest = st.fixed_dictionaries(
        {"name": names()},
        optional={
            "external_id": st.none() | ids(),
            "parent_id": st.none() | ids(),
            "external_member_id": st.none() | ids(),
            "timestamp": st.none() | stamps,
            "metadata": st.none() | metadata(),
        },
    )
    return st.builds(lambda who, fields: {**fields, **who}, customer, rest)
