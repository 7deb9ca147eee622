"""Prices for `_llm` events that carry no `_cost` (`PUT /v1/pricing/settings`): from an
organization's own per-model prices (`overrides`), else from the `genai-prices` catalogue (the
installed package's, at the event's timestamp), with an optional markup; `catalog.py` reads the
catalogue.

Validation prices (`meters.events.validate_body`), so the `_cost` is in the event before it is
durable and every core and replica reads the same amount. Per priced event:

1. The event's `_llm` (vendor, model, input, output and cached input tokens) is looked up:
   `overrides["<vendor>/<model>"]`, else the catalogue (vendor = its provider id) when
   `catalog` is on. A model found in neither is not priced and is counted (`Priced.unpriced`),
   never guessed; so is a count the catalogue refuses (cached above input) or an amount above
   what `_cost` holds.
2. The amount in cents is the catalogue's own calculation (its decomposition of cached
   tokens, tiers, prices changing by date) times 100, then `markup_percent` more, rounded
   half-even to `_cost`'s 12 decimal places.
3. The event gets `_cost` (`amount`, `currency` usd) and `priceTable` (the catalogue's version,
   `genai-prices <version>`, or `overrides`) in its metadata.

Costs are computed on whole batches in integers of 10^-12 cents (`catalog.Linear`), exact;
prices the integers cannot hold exactly are computed with the catalogue's Decimals.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from itertools import repeat
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from meters.catalog import (
    DAY_US,
    UNITS_PER_CENT,
    Linear,
    Linears,
    catalog,
    cents,
)

__all__ = [
    "MAX_MARKUP_PERCENT",
    "MAX_OVERRIDES",
    "OVERRIDES_TABLE",
    "LlmCalls",
    "Priced",
    "Pricing",
    "PricingSettingsUpdate",
]

MAX_OVERRIDES = 1000
MAX_MARKUP_PERCENT = 1000
OVERRIDES_TABLE = "overrides"
# `_cost.amount` holds at most 5 whole digits of cents (`meters.events.usage`).
_MAX_UNITS = 100_000 * UNITS_PER_CENT - 1
_MAX_CENTS = Decimal(100_000)
_PLACES = Decimal("1e-12")
_DECIMAL = pa.decimal128(38, 12)
_PLAIN_UNITS = 10**6  # Arrow spells a decimal of scale 12 plainly from here on
_compute: Any = pc  # the stubs' overloads do not cover these string kernels
_UNPRICED, _PER_CALL = -1, -2
_KEPT = 100_000  # names, and (name, day) lookups, a Pricing keeps
_EACH_BELOW = 64  # calls priced one by one rather than on columns
_FLAGS = 1 << 16  # (name, day) pairs a batch's lookup table may span


def _decimal_of(value: Any) -> Any:
    """A number or a decimal string as a Decimal (the API parses strictly otherwise)."""
    if type(value) in (int, float, str):
        try:
            return Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    return value


_Decimal = Annotated[Decimal, BeforeValidator(_decimal_of)]
_Price = Annotated[_Decimal, Field(ge=0, max_digits=17, decimal_places=12)]
I64 = npt.NDArray[np.int64]


class OverridePrice(BaseModel):
    """One model's own prices, in cents per token (as `--otlp-prices`). Cached input tokens
    cost `cached_input`, or `input` when it is not given."""

    model_config = ConfigDict(extra="forbid")

    input: _Price
    output: _Price
    cached_input: _Price | None = None


class PricingSettingsUpdate(BaseModel):
    """The whole of an organization's pricing settings (a PUT: what is left out is unset)."""

    model_config = ConfigDict(extra="forbid")

    catalog: bool = False
    markup_percent: Annotated[_Decimal, Field(ge=0, le=MAX_MARKUP_PERCENT, decimal_places=2)] = (
        Decimal(0)
    )
    overrides: dict[str, OverridePrice] = Field(default_factory=dict, max_length=MAX_OVERRIDES)

    @field_validator("overrides")
    @classmethod
    def _keys(cls, value: dict[str, OverridePrice]) -> dict[str, OverridePrice]:
        for key in value:
            vendor, slash, model = key.partition("/")
            if not (slash and vendor and model) or len(key) > 512:
                raise ValueError(f"{key!r}: a key is '<provider>/<model>' (at most 512 characters)")
        return value

    def document(self) -> dict[str, Any]:
        """As stored and answered: decimals as strings, exact."""
        return {
            "catalog": self.catalog,
            "markup_percent": str(self.markup_percent),
            "overrides": {
                k: {n: str(p) for n, p in v.model_dump(exclude_none=True).items()}
                for k, v in self.overrides.items()
            },
        }


@dataclass(frozen=True, slots=True)
class LlmCalls:
    """The `_llm` of the events to price, as columns (cached: 0 when not given)."""

    names: Sequence[tuple[str, str]]  # (vendor, model)
    timestamps_us: I64
    inputs: I64
    outputs: I64
    cached: I64


@dataclass(slots=True)
class Priced:
    """Per call, its `_cost.amount` (canonical decimal string; null: not priced) and
    `priceTable` (`tables[overridden[i]]`); and what was not priced, per `<vendor>/<model>`."""

    amounts: pa.StringArray
    overridden: npt.NDArray[np.int8]  # 1: from the organization's overrides, 0: the catalogue
    tables: tuple[str, str]
    unpriced: Counter[str] = field(default_factory=Counter)


class _Kept:
    """What a `Pricing` looked up: each (vendor, model) numbered, each (number, UTC day)'s
    coefficients by index, and their table (made again when one is added). A batch holds
    `lock` while it prices: its numbers must mean the same names throughout."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.numbers: dict[tuple[str, str], int] = {}
        self.names: list[tuple[str, str]] = []
        self.found: dict[tuple[int, int], tuple[int, bool]] = {}  # by (number, day)
        self.linears: list[Linear] = []
        self._index: dict[int, int] = {}
        self._table: Linears | None = None

    def numbered(self, names: Sequence[tuple[str, str]]) -> I64:
        """Each name's number (a name not seen before is numbered now)."""
        if len(self.names) >= _KEPT or len(self.found) >= _KEPT:
            # Unbounded names must not grow memory; finding again is cheap.
            self.numbers.clear()
            self.names.clear()
            self.found.clear()
        numbers = self.numbers
        keys = np.fromiter(map(numbers.get, names, repeat(-1)), np.int64, len(names))
        for at in np.flatnonzero(keys < 0).tolist():
            name = names[at]
            if (number := numbers.get(name)) is None:
                number = numbers[name] = len(self.names)
                self.names.append(name)
            keys[at] = number
        return keys

    def index(self, linear: Linear) -> int:
        at = self._index.get(id(linear))
        if at is None or self.linears[at] is not linear:
            at = self._index[id(linear)] = len(self.linears)
            self.linears.append(linear)
            self._table = None
        return at

    def table(self) -> Linears:
        if self._table is None:
            self._table = Linears(self.linears)
        return self._table


@dataclass(frozen=True, slots=True)
class Pricing:
    """An organization's settings as validation applies them (it pickles: validation workers
    take it with each body). Build with `of`."""

    catalog: bool
    markup_percent: Decimal
    overrides: Mapping[str, Linear]
    _kept: _Kept = field(default_factory=lambda: _Kept(), compare=False, repr=False)

    def __reduce__(self) -> tuple[type[Pricing], tuple[bool, Decimal, Mapping[str, Linear]]]:
        # To a validation worker without what it looked up (that may be large).
        return (Pricing, (self.catalog, self.markup_percent, self.overrides))

    @classmethod
    def of(cls, document: Mapping[str, Any]) -> Pricing | None:
        """From a stored document (`PricingSettingsUpdate.document`); None when it prices
        nothing."""
        settings = PricingSettingsUpdate.model_validate(document)
        if not settings.catalog and not settings.overrides:
            return None
        overrides = {
            key: Linear.of_cents(p.input, p.output, p.cached_input)
            for key, p in settings.overrides.items()
        }
        return cls(settings.catalog, settings.markup_percent, overrides)

    def price(self, calls: LlmCalls, *, each_below: int = _EACH_BELOW) -> Priced:
        """Steps 1 and 2 for a batch of calls: each distinct (model, UTC day) is looked up
        once (and kept). Fewer than `each_below` calls are priced one by one, more on whole
        columns: column operations cost 90-200 µs a batch however small, one by one about
        3 µs a call (measured: they break even near 64)."""
        known = catalog() if self.catalog else None
        tables = (known.version if known else "", OVERRIDES_TABLE)
        if not calls.names:
            return Priced(pa.array([], pa.string()), np.zeros(0, np.int8), tables)
        with self._kept.lock:
            return self._price(calls, tables, each_below)

    def _price(self, calls: LlmCalls, tables: tuple[str, str], each_below: int) -> Priced:
        kept = self._kept
        keys = kept.numbered(calls.names)
        days = calls.timestamps_us // DAY_US
        if len(keys) < each_below:
            return self._each(calls, keys, days, tables)
        pairs, inverse = _distinct(keys, days)
        found = [self._found(key, day) for key, day in pairs]
        which = np.array([f[0] for f in found], np.int64)[inverse]
        overridden = np.array([f[1] for f in found], np.int8)[inverse]
        units, exact = self._units(calls, which, keys)
        spelled = self._amounts(units, exact)
        unpriced: Counter[str] = Counter()
        missing = np.asarray(spelled.is_null())
        if missing.any():
            names = kept.names
            counted = np.bincount(keys[missing])
            unpriced.update({"/".join(names[k]): int(v) for k, v in enumerate(counted) if v})
        return Priced(spelled, overridden, tables, unpriced)

    def _each(self, calls: LlmCalls, keys: I64, days: I64, tables: tuple[str, str]) -> Priced:
        """`price` call by call, in Decimals."""
        amounts: list[str | None] = []
        overridden: list[bool] = []
        unpriced: Counter[str] = Counter()
        for row, (key, day) in enumerate(zip(keys.tolist(), days.tolist(), strict=True)):
            which, override = self._found(key, day)
            found = self._cents(calls, row, which, key)
            units = None if found is None else self._marked(found)
            if units is None:
                unpriced["/".join(self._kept.names[key])] += 1
                amounts.append(None)
            else:
                amounts.append(format((Decimal(units) / UNITS_PER_CENT).normalize(), "f"))
            overridden.append(override)
        spelled = pa.array(amounts, pa.string())
        return Priced(spelled, np.array(overridden, np.int8), tables, unpriced)

    def _found(self, number: int, day: int) -> tuple[int, bool]:
        """Step 1 for a numbered (vendor, model) on a UTC day, kept: an index of
        `_kept.linears` (or `_UNPRICED`, `_PER_CALL`), and whether it is an override."""
        kept = self._kept
        key = (number, day)
        found = kept.found.get(key)
        if found is not None:
            return found
        vendor, model = kept.names[number]
        linear = self.overrides.get(f"{vendor}/{model}")
        found = (_UNPRICED, linear is not None)
        if linear is None and self.catalog and (pricer := catalog().pricer(vendor, model)):
            # Prices by time of day, or not linear: per call.
            linear = None if pricer.days is None else pricer.linear_on(day)
            found = (_PER_CALL, False)
        if linear is not None:
            found = (kept.index(linear), found[1])
        kept.found[key] = found
        return found

    def _units(self, calls: LlmCalls, which: I64, keys: I64) -> tuple[I64, dict[int, Decimal]]:
        """Each call's units (-1: not priced), and the cents of those only Decimals hold."""
        units = np.full(len(which), -1, np.int64)
        exact: dict[int, Decimal] = {}
        rows = np.flatnonzero(which >= 0)
        if rows.size:
            found, large = self._kept.table().units(
                which[rows], calls.inputs[rows], calls.outputs[rows], calls.cached[rows]
            )
            units[rows] = found
            alone = rows[large].tolist()
        else:
            alone = []
        for row in alone + np.flatnonzero(which == _PER_CALL).tolist():
            found_cents = self._cents(calls, row, int(which[row]), int(keys[row]))
            if found_cents is not None:
                exact[row] = found_cents
        return units, exact

    def _cents(self, calls: LlmCalls, row: int, which: int, key: int) -> Decimal | None:
        """One call's cents before the markup, with Python's integers or the catalogue's
        Decimals; None where not priced (`which` is `_found`'s)."""
        if which == _UNPRICED:
            return None
        counts = int(calls.inputs[row]), int(calls.cached[row]), int(calls.outputs[row])
        if which == _PER_CALL:
            pricer = catalog().pricer(*self._kept.names[key])
            assert pricer is not None
            price = pricer.price_at(int(calls.timestamps_us[row]))
            linear = pricer.linear(price)
            if linear is None:
                return cents(price, *counts)
        else:
            linear = self._kept.linears[which]
        units = linear.exact(*counts)
        return None if units is None else Decimal(units) / UNITS_PER_CENT

    def _marked(self, found: Decimal) -> int | None:
        """Step 2's markup and rounding of one call's cents, in units; None above `_cost`'s
        limit."""
        marked = found * (self.markup_percent + 100) / 100
        if marked >= _MAX_CENTS:  # above the limit, and too large to quantize
            return None
        units = int(marked.quantize(_PLACES, ROUND_HALF_EVEN) * UNITS_PER_CENT)
        return units if units <= _MAX_UNITS else None

    def _amounts(self, units: I64, exact: Mapping[int, Decimal]) -> pa.StringArray:
        """Step 2's markup and rounding, and the canonical spelling; null where not priced or
        above `_cost`'s limit."""
        factor = int(self.markup_percent * 100) + 10_000  # (100 + markup) / 100, in 1/10,000
        priced = (units >= 0) & (units <= _MAX_UNITS)
        units = np.where(priced, units, 0)
        if factor != 10_000:
            # units * factor / 10,000, rounded half-even, without overflowing int64.
            whole, rest = np.divmod(units, 10_000)
            carry, remainder = np.divmod(rest * factor, 10_000)
            quotient = whole * factor + carry
            odd = (quotient & 1) == 1
            units = quotient + ((remainder > 5_000) | ((remainder == 5_000) & odd))
        priced &= units <= _MAX_UNITS
        for row, found in exact.items():
            marked = self._marked(found)
            priced[row] = marked is not None
            units[row] = marked or 0
        return _spelled(units, priced)


def _distinct(keys: I64, days: I64) -> tuple[list[tuple[int, int]], I64]:
    """The distinct (key, day) pairs of the calls, and each call's index among them: by a
    table of flags when the pairs span few values (a third of sorting's cost), else sorted."""
    low = int(days.min())
    span = int(days.max()) - low + 1
    combined = keys * span + (days - low)
    size = (int(keys.max()) + 1) * span
    if size <= _FLAGS:
        present = np.zeros(size, np.bool_)
        present[combined] = True
        combos = np.flatnonzero(present)
        inverse = (np.cumsum(present) - 1)[combined]
    else:
        combos, inverse = np.unique(combined, return_inverse=True)
    return [(c // span, c % span + low) for c in combos.tolist()], inverse


def _spelled(units: I64, valid: npt.NDArray[np.bool_]) -> pa.StringArray:
    """Units of 10^-12 cents (not negative) as `_cost.amount`'s canonical spelling (no
    needless zeros), on the whole column; null where not `valid`."""
    # The units are a decimal of scale 12 as they are: Arrow spells that with 12 places, but
    # below 10^6 units in scientific notation: those are spelled otherwise.
    words = np.zeros((len(units), 2), np.int64)  # 128-bit little-endian, high word 0
    words[:, 0] = units
    validity = pa.array(valid).buffers()[1]
    decimals = pa.Array.from_buffers(_DECIMAL, len(units), [validity, pa.py_buffer(words.data)])
    spelled: pa.StringArray = _compute.utf8_rtrim(
        _compute.utf8_rtrim(decimals.cast(pa.string()), "0"), "."
    )
    zero = valid & (units == 0)
    if zero.any():  # commonly: a model free of charge
        spelled = _compute.if_else(zero, "0", spelled)
    small = valid & (units < _PLAIN_UNITS) & ~zero
    if small.any():  # less than a millionth of a cent: "0." and the 12 places, padded
        digits = _compute.utf8_lpad(pa.array(units[small]).cast(pa.string()), 12, "0")
        plain = _compute.utf8_rtrim(_compute.binary_join_element_wise("0.", digits, ""), "0")
        spelled = _compute.replace_with_mask(spelled, small, plain)
    return spelled
