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

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
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
_DAYS = 2**22  # more UTC days than lie between year 1 and 9999
_compute: Any = pc  # the stubs' overloads do not cover these string kernels
_UNPRICED, _PER_CALL = -1, -2
_KEPT = 100_000  # (model, day) lookups a Pricing keeps


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

    vendors: Sequence[str]
    models: Sequence[str]
    timestamps_us: I64
    inputs: I64
    outputs: I64
    cached: I64


@dataclass(slots=True)
class Priced:
    """Per call, its `_cost.amount` (canonical decimal string; None: not priced) and
    `priceTable` (`tables[overridden[i]]`); and what was not priced, per `<vendor>/<model>`."""

    amounts: list[str | None]
    overridden: list[int]  # 1: from the organization's overrides, 0: from the catalogue
    tables: tuple[str, str]
    unpriced: Counter[str] = field(default_factory=Counter)


class _Kept:
    """What a `Pricing` looked up: each (model, UTC day)'s coefficients by index, and their
    table (made again when one is added)."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, int], tuple[int, bool]] = {}
        self.linears: list[Linear] = []
        self._index: dict[int, int] = {}
        self._table: Linears | None = None

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

    def price(self, calls: LlmCalls) -> Priced:
        """Steps 1 and 2 for a batch of calls, on whole columns: each distinct (model, UTC
        day) is looked up once (and kept), and the calls priced together by their
        coefficients."""
        n = len(calls.models)
        # Each (vendor, model) numbered, in C: NUL is in no validated string.
        encoded = _compute.binary_join_element_wise(
            pa.array(calls.vendors, pa.string()), pa.array(calls.models, pa.string()), "\0"
        ).dictionary_encode()
        keys = encoded.indices.to_numpy().astype(np.int64)
        names: list[str] = encoded.dictionary.to_pylist()
        days = calls.timestamps_us // DAY_US
        low = int(days.min()) if n else 0
        combos, inverse = np.unique(keys * _DAYS + (days - low), return_inverse=True)
        found = [self._found(names[c // _DAYS], c % _DAYS + low) for c in combos.tolist()]
        which = np.array([f[0] for f in found], np.int64)[inverse]
        overridden = np.array([f[1] for f in found], np.int8)[inverse]
        units, exact = self._units(calls, which, names, keys)
        spelled = self._amounts(units, exact)
        unpriced: Counter[str] = Counter()
        missing = np.asarray(spelled.is_null())
        if missing.any():
            counted = np.bincount(keys[missing], minlength=len(names))
            unpriced.update(
                {names[k].replace("\0", "/"): int(v) for k, v in enumerate(counted) if v}
            )
        known = catalog() if self.catalog else None
        tables = (known.version if known else "", OVERRIDES_TABLE)
        return Priced(spelled.to_pylist(), overridden.tolist(), tables, unpriced)

    def _found(self, name: str, day: int) -> tuple[int, bool]:
        """Step 1 for a `vendor\0model` on a UTC day, kept: an index of `_kept.linears`
        (or `_UNPRICED`, `_PER_CALL`), and whether it is an override."""
        kept = self._kept
        key = (name, day)
        found = kept.found.get(key)
        if found is not None:
            return found
        vendor, model = name.split("\0", 1)
        linear = self.overrides.get(f"{vendor}/{model}")
        found = (_UNPRICED, linear is not None)
        if linear is None and self.catalog and (pricer := catalog().pricer(vendor, model)):
            # Prices by time of day, or not linear: per call.
            linear = None if pricer.days is None else pricer.linear_on(day)
            found = (_PER_CALL, False)
        if linear is not None:
            found = (kept.index(linear), found[1])
        if len(kept.found) >= _KEPT:
            kept.found.clear()  # unbounded names must not grow memory; finding is cheap
        kept.found[key] = found
        return found

    def _units(
        self, calls: LlmCalls, which: I64, names: list[str], keys: I64
    ) -> tuple[I64, dict[int, Decimal]]:
        """Each call's units (-1: not priced), and the cents of those only Decimals hold."""
        units = np.full(len(which), -1, np.int64)
        exact: dict[int, Decimal] = {}
        rows = np.flatnonzero(which >= 0)
        linears = self._kept.linears
        if rows.size:
            found, large = self._kept.table().units(
                which[rows], calls.inputs[rows], calls.outputs[rows], calls.cached[rows]
            )
            units[rows] = found
            for row in rows[large].tolist():
                found_cents = _cents_of(linears[which[row]], calls, row)
                if found_cents is not None:
                    exact[row] = found_cents
        for row in np.flatnonzero(which == _PER_CALL).tolist():
            pricer = catalog().pricer(*names[keys[row]].split("\0", 1))
            assert pricer is not None
            price = pricer.price_at(int(calls.timestamps_us[row]))
            linear = pricer.linear(price)
            if linear is None:
                found_cents = cents(price, *_counts(calls, row))
            else:
                found_cents = _cents_of(linear, calls, row)
            if found_cents is not None:
                exact[row] = found_cents
        return units, exact

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
            marked = found * (self.markup_percent + 100) / 100
            if marked < _MAX_CENTS:  # above `_cost`'s limit, and too large to quantize
                amount = marked.quantize(_PLACES, ROUND_HALF_EVEN)
                units[row] = int(amount * UNITS_PER_CENT)
                priced[row] = units[row] <= _MAX_UNITS
        return _spelled(units, priced)


def _counts(calls: LlmCalls, row: int) -> tuple[int, int, int]:
    """(input, cached, output) of one call."""
    return int(calls.inputs[row]), int(calls.cached[row]), int(calls.outputs[row])


def _cents_of(linear: Linear, calls: LlmCalls, row: int) -> Decimal | None:
    """One call's cents by its coefficients, with Python's integers (any size)."""
    units = linear.exact(*_counts(calls, row))
    return None if units is None else Decimal(units) / UNITS_PER_CENT


def _spelled(units: I64, valid: npt.NDArray[np.bool_]) -> pa.StringArray:
    """Units of 10^-12 cents as `_cost.amount`'s canonical spelling (no needless zeros), on
    the whole column; null where not `valid`."""
    # The digits, at least 13 (a whole part), the point put in before the last 12.
    digits = _compute.utf8_lpad(pa.array(units, mask=~valid).cast(pa.string()), 13, "0")
    text = _compute.binary_join_element_wise(
        _compute.utf8_slice_codeunits(digits, 0, -12),
        _compute.utf8_slice_codeunits(digits, -12),
        ".",
    )
    spelled: pa.StringArray = _compute.utf8_rtrim(_compute.utf8_rtrim(text, "0"), ".")
    return spelled
