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
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from meters.catalog import UNITS_PER_CENT, Linear, catalog, installed_version

__all__ = [
    "MAX_MARKUP_PERCENT",
    "MAX_OVERRIDES",
    "OVERRIDES_TABLE",
    "LlmCalls",
    "Priced",
    "Pricing",
    "PricingSettingsUpdate",
    "catalog_version",
]

MAX_OVERRIDES = 1000
MAX_MARKUP_PERCENT = 1000
OVERRIDES_TABLE = "overrides"
# `_cost.amount` holds at most 5 whole digits of cents (`meters.events.usage`).
_MAX_UNITS = 100_000 * UNITS_PER_CENT - 1
_MAX_CENTS = Decimal(100_000)
_PLACES = Decimal("1e-12")


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


def catalog_version() -> str:
    """The catalogue in force: `genai-prices <installed version>`."""
    return installed_version()


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
    """Per call, its `_cost.amount` (canonical decimal string) and `priceTable`, or None for
    one not priced; and what was not priced, per `<vendor>/<model>`."""

    amounts: list[str | None]
    tables: list[str | None]
    unpriced: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Pricing:
    """An organization's settings as validation applies them (it pickles: validation workers
    take it with each body). Build with `of`."""

    catalog: bool
    markup_percent: Decimal
    overrides: Mapping[str, Linear]

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
        """Steps 1 and 2 for a batch of calls."""
        n = len(calls.models)
        units = np.full(n, -1, np.int64)  # -1: not priced
        tables: list[str | None] = [None] * n
        exact: dict[int, Decimal] = {}  # the calls whose cents only Decimals hold
        unpriced: Counter[str] = Counter()
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(calls.vendors, calls.models, strict=True)):
            groups.setdefault(key, []).append(i)
        known = catalog() if self.catalog else None
        for (vendor, model), indexes in groups.items():
            at = np.array(indexes, np.int64)
            name = f"{vendor}/{model}"
            override = self.overrides.get(name)
            if override is not None:
                found = override.units(calls.inputs[at], calls.outputs[at], calls.cached[at])
                table = OVERRIDES_TABLE
            elif known is not None and (pricer := known.pricer(vendor, model)) is not None:
                found = pricer.units(
                    calls.timestamps_us[at], calls.inputs[at], calls.outputs[at], calls.cached[at]
                )
                table = known.version
            else:
                unpriced[name] += len(indexes)
                continue
            fast, slow = found
            units[at] = fast
            exact.update((indexes[j], cents) for j, cents in slow.items())
            for j in range(len(indexes)):
                tables[indexes[j]] = table
        amounts = self._amounts(units, exact)
        for i in range(n):
            if tables[i] is not None and amounts[i] is None:
                unpriced[f"{calls.vendors[i]}/{calls.models[i]}"] += 1
                tables[i] = None
        return Priced(amounts, tables, unpriced)

    def _amounts(self, units: I64, exact: Mapping[int, Decimal]) -> list[str | None]:
        """Step 2's markup and rounding, and the canonical spelling; None where not priced
        or above `_cost`'s limit."""
        factor = int(self.markup_percent * 100) + 10_000  # (100 + markup) / 100, in 1/10,000
        priced = units >= 0
        if factor != 10_000:
            # units * factor / 10,000, rounded half-even, without overflowing int64.
            whole, rest = np.divmod(units, 10_000)
            scaled = rest * factor
            carry, remainder = np.divmod(scaled, 10_000)
            quotient = whole * factor + carry
            odd = (quotient & 1) == 1
            units = quotient + ((remainder > 5_000) | ((remainder == 5_000) & odd))
        units = np.where(priced & (units <= _MAX_UNITS), units, -1)
        amounts: list[str | None] = [None if u < 0 else _spelled(u) for u in units.tolist()]
        markup = (self.markup_percent + 100) / 100
        for i, cents in exact.items():
            marked = cents * markup
            if marked >= _MAX_CENTS:  # above `_cost`'s limit (and quantizing would overflow)
                continue
            amount = marked.quantize(_PLACES, ROUND_HALF_EVEN)
            amounts[i] = None if amount * UNITS_PER_CENT > _MAX_UNITS else _decimal(amount)
        return amounts


def _spelled(units: int) -> str:
    """Units of 10^-12 cents as `_cost.amount`'s canonical spelling (no needless zeros)."""
    whole, fraction = divmod(units, UNITS_PER_CENT)
    if not fraction:
        return str(whole)
    return f"{whole}.{fraction:012d}".rstrip("0")


def _decimal(amount: Decimal) -> str:
    text = format(amount.normalize(), "f")
    return "0" if text in ("-0", "0") else text
