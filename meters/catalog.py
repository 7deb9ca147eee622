"""The `genai-prices` catalogue (pydantic's maintained model prices), read for `pricing`: a
model's prices at an event's timestamp as integer coefficients, so that a batch of calls is
priced with a few array operations and still exactly as the catalogue calculates.

How a model's prices become coefficients (`Linear`), for a call of i input tokens of which c
were cached reads, and o output tokens:

1. The prices in force on the call's UTC date (prices that change by date are split at the
   dates; the few that change by time of day are looked up per call).
2. The catalogue's price is linear in (i, c, o) between tier thresholds (a tier applies to
   every token once the input passes its start): its constant and slopes are read by asking
   the catalogue itself for a few calls at each tier's lower end, and checked at another.
3. The slopes are in 10^-12 cents per token. A price they cannot hold exactly (more decimal
   places), or that is not linear, is computed per call by the catalogue, in Decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from importlib.metadata import version
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["UNITS_PER_CENT", "Catalog", "Linear", "ModelPricer", "catalog", "installed_version"]

UNITS_PER_CENT = 10**12
_DAY_US = 86_400_000_000
_EPOCH = date(1970, 1, 1)
# A call with a term of its cost above this is refused rather than overflowed (int64 holds
# 9.2e18: four such terms and the constant still fit); `_cost`'s limit is 1e17 units anyway.
_TERM_LIMIT = 2e18
_MODELS_KEPT = 10_000
I64 = npt.NDArray[np.int64]
# Per call of a group: its units (-1: not priced; the Decimal ones aside), and the cents of
# those only Decimals hold, by position in the group.
Units = tuple[I64, dict[int, Decimal]]


@dataclass(frozen=True, slots=True)
class Linear:
    """Cost in units (10^-12 cents) = constant + slopes . (i, c, o), the slopes of the tier
    whose start the input passes (`starts[k - 1] < i <= starts[k]` is tier k)."""

    constant: int
    starts: tuple[int, ...]
    slopes: tuple[tuple[int, int, int], ...]  # per tier: input, cached, output
    # Cached tokens above the input tokens are refused (the catalogue does where it prices
    # cache reads; an override always does).
    strict: bool = True

    @classmethod
    def of_cents(cls, input: Decimal, output: Decimal, cached: Decimal | None) -> Linear:
        """Prices in cents per token (at most 12 decimal places)."""
        read = input if cached is None else cached
        slope = (
            int(input * UNITS_PER_CENT),
            int((read - input) * UNITS_PER_CENT),
            int(output * UNITS_PER_CENT),
        )
        return cls(0, (), (slope,))

    def units(self, inputs: I64, outputs: I64, cached: I64) -> Units:
        tier = np.searchsorted(np.array(self.starts, np.int64), inputs, side="left")
        slopes = np.array(self.slopes, np.int64)[tier]
        # Floats first: no term, and so no sum of the four, may overflow the integers; the
        # calls with a larger one are computed with Python's integers.
        terms = slopes.astype(np.float64) * np.stack([inputs, cached, outputs], axis=1)
        small = np.all(np.abs(terms) < _TERM_LIMIT, axis=1)
        allowed = cached <= inputs if self.strict else np.ones(len(inputs), np.bool_)
        fits = small & allowed
        safe = np.where(fits, 1, 0)
        found = (
            self.constant
            + slopes[:, 0] * (inputs * safe)
            + slopes[:, 1] * (cached * safe)
            + slopes[:, 2] * (outputs * safe)
        )
        exact: dict[int, Decimal] = {}
        for j in np.flatnonzero(allowed & ~small).tolist():
            a, b, d = (int(v) for v in slopes[j])
            units = self.constant + a * int(inputs[j]) + b * int(cached[j]) + d * int(outputs[j])
            exact[j] = Decimal(units) / UNITS_PER_CENT
        return np.where(fits, found, -1), exact


class ModelPricer:
    """One catalogue model's prices (step 1), each made `Linear` once (steps 2 and 3)."""

    def __init__(self, model: Any) -> None:
        from genai_prices import types

        self._model = model
        self._linear: dict[int, tuple[Any, Linear | None]] = {}
        prices = model.prices
        self._days: npt.NDArray[np.int64] | None = None
        if isinstance(prices, types.ModelPrice):
            self._days = np.zeros(0, np.int64)
        elif all(
            c.constraint is None or isinstance(c.constraint, types.StartDateConstraint)
            for c in prices
        ):
            starts = {
                (c.constraint.start_date - _EPOCH).days for c in prices if c.constraint is not None
            }
            self._days = np.array(sorted(starts), np.int64)

    def units(self, timestamps_us: I64, inputs: I64, outputs: I64, cached: I64) -> Units:
        n = len(inputs)
        if self._days is not None:  # prices change by date at most: split at the dates
            periods = np.searchsorted(self._days, timestamps_us // _DAY_US, side="right")
            keys = periods.tolist()
        else:  # by time of day too: ask per call
            keys = [id(self._prices_at(int(t))) for t in timestamps_us.tolist()]
        members: dict[int, list[int]] = {}
        for j, key in enumerate(keys):
            members.setdefault(key, []).append(j)
        found = np.full(n, -1, np.int64)
        exact: dict[int, Decimal] = {}
        for indexes in members.values():
            at = np.array(indexes, np.int64)
            price = self._prices_at(int(timestamps_us[indexes[0]]))
            linear = self._linear_of(price)
            if linear is not None:
                units, large = linear.units(inputs[at], outputs[at], cached[at])
                found[at] = units
                exact.update((indexes[j], cents) for j, cents in large.items())
                continue
            for j in indexes:
                cents = _cents(price, int(inputs[j]), int(cached[j]), int(outputs[j]))
                if cents is not None:
                    exact[j] = cents
        return found, exact

    def _prices_at(self, timestamp_us: int) -> Any:
        return self._model.get_prices(datetime.fromtimestamp(timestamp_us / 1e6, UTC))

    def _linear_of(self, price: Any) -> Linear | None:
        kept = self._linear.get(id(price))
        if kept is None or kept[0] is not price:
            kept = (price, _linear(price))
            self._linear[id(price)] = kept
        return kept[1]


class Catalog:
    """The installed catalogue: its version, and each (provider, model) found once."""

    def __init__(self) -> None:
        from genai_prices import data_snapshot

        self.version = installed_version()
        self._snapshot = data_snapshot.get_snapshot()
        self._pricers: dict[tuple[str, str], ModelPricer | None] = {}

    def pricer(self, vendor: str, model: str) -> ModelPricer | None:
        """The model's prices, or None when the catalogue has no such provider or model."""
        key = (vendor, model)
        if key in self._pricers:
            return self._pricers[key]
        try:
            _, info = self._snapshot.find_provider_model(model, None, vendor, None)
        except LookupError:
            found = None
        else:
            found = ModelPricer(info)
        if len(self._pricers) >= _MODELS_KEPT:
            self._pricers.clear()  # unbounded names must not grow memory; finding is cheap
        self._pricers[key] = found
        return found


def installed_version() -> str:
    """`genai-prices <version>`: the installed package's, without reading its data."""
    return f"genai-prices {version('genai-prices')}"


@cache
def catalog() -> Catalog:
    """The process's catalogue, read at first use (importing it takes about 0.3 s)."""
    return Catalog()


def _cents(price: Any, inputs: int, cached: int, outputs: int) -> Decimal | None:
    """The catalogue's own calculation of one call, in cents; None where it refuses it."""
    from genai_prices import Usage

    usage = Usage(input_tokens=inputs, cache_read_tokens=cached, output_tokens=outputs)
    try:
        total: Decimal = price.calc_price(usage)["total_price"]
    except ValueError:  # cached above input
        return None
    return total * 100


def _linear(price: Any) -> Linear | None:
    """Step 2: the price's coefficients, or None when it is not linear in integer units."""
    from genai_prices import types

    starts = sorted(
        {
            tier.start
            for value in vars(price).values()
            if isinstance(value, types.TieredPrices)
            for tier in value.tiers
        }
    )
    constant = _units(_cents(price, 0, 0, 0))
    if constant is None:
        return None
    slopes = []
    for low in (0, *(start + 1 for start in starts)):
        i = max(low, 1)
        base = _units(_cents(price, i, 0, 0))
        read = _units(_cents(price, i, 1, 0))
        out = _units(_cents(price, i, 0, 1))
        if base is None or read is None or out is None or (base - constant) % i:
            return None
        slopes.append(((base - constant) // i, read - base, out - base))
    strict = _cents(price, 0, 1, 0) is None
    linear = Linear(constant, tuple(starts), tuple(slopes), strict)
    # The check: another call of every tier, against the catalogue.
    for low in (0, *(start + 1 for start in starts)):
        i, c, o = low + 7, 3, 11
        if linear.units(*(np.array([v], np.int64) for v in (i, o, c)))[0][0] != _units(
            _cents(price, i, c, o)
        ):
            return None
    return linear


def _units(cents: Decimal | None) -> int | None:
    """Cents as integer units, or None when they are not a whole number of them."""
    if cents is None:
        return None
    units = cents * UNITS_PER_CENT
    return int(units) if units == units.to_integral_value() else None
