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

from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from importlib.metadata import version
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DAY_US",
    "UNITS_PER_CENT",
    "Catalog",
    "Linear",
    "Linears",
    "ModelPricer",
    "catalog",
    "cents",
    "installed_version",
]

UNITS_PER_CENT = 10**12
DAY_US = 86_400_000_000
_NEVER = 2**63 - 1  # a tier start no count passes
_EPOCH = date(1970, 1, 1)
# A call with a term of its cost above this is refused rather than overflowed (int64 holds
# 9.2e18: four such terms and the constant still fit); `_cost`'s limit is 1e17 units anyway.
_TERM_LIMIT = 2e18
_MODELS_KEPT = 10_000
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Linear:
    """Cost in units (10^-12 cents) = constant + slopes . (i, c, o), the slopes of the tier
    whose start the input passes (tier k when `starts[k - 1] < i <= starts[k]`)."""

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

    def exact(self, inputs: int, cached: int, outputs: int) -> int | None:
        """One call's units with Python's integers (any size); None where refused."""
        if self.strict and cached > inputs:
            return None
        tier = sum(1 for start in self.starts if inputs > start)
        a, b, d = self.slopes[tier]
        return self.constant + a * inputs + b * cached + d * outputs


class Linears:
    """Many calls, each with its `Linear` (by index into `linears`), priced at once."""

    def __init__(self, linears: list[Linear]) -> None:
        tiers = max(len(x.starts) for x in linears)
        # Padded: a start no count passes, and its last tier's slopes repeated.
        self._starts = np.array(
            [[*x.starts, *[_NEVER] * (tiers - len(x.starts))] for x in linears], np.int64
        ).reshape(len(linears), tiers)
        self._slopes = np.array(
            [[*x.slopes, *[x.slopes[-1]] * (tiers - len(x.starts))] for x in linears], np.int64
        )
        self._constants = np.array([x.constant for x in linears], np.int64)
        self._strict = np.array([x.strict for x in linears], np.bool_)
        self._largest = float(np.abs(self._slopes).max())

    def units(self, which: I64, inputs: I64, outputs: I64, cached: I64) -> tuple[I64, I64]:
        """Each call's units (-1: refused), and the calls too large for int64 (to be priced
        with `Linear.exact`)."""
        if self._starts.shape[1]:
            tier = (inputs[:, None] > self._starts[which]).sum(axis=1)
            slopes = self._slopes[which, tier]
        else:
            slopes = self._slopes[which, 0]
        counts = np.stack([inputs, cached, outputs], axis=1)
        allowed = ~self._strict[which] | (cached <= inputs)
        # No term, and so no sum of the four, may overflow the integers: checked on the
        # largest first, each call only when that could.
        if self._largest * float(counts.max(initial=0)) < _TERM_LIMIT:
            large = np.zeros(0, np.int64)
            fits = allowed
        else:
            small = np.all(np.abs(slopes.astype(np.float64) * counts) < _TERM_LIMIT, axis=1)
            large = np.flatnonzero(allowed & ~small)
            fits = small & allowed
        if not fits.all():
            counts = np.where(fits[:, None], counts, 0)
        found = self._constants[which] + np.einsum("ij,ij->i", slopes, counts)
        return np.where(fits, found, -1), large


class ModelPricer:
    """One catalogue model's prices (step 1), each made `Linear` once (steps 2 and 3)."""

    def __init__(self, model: Any) -> None:
        from genai_prices import types

        self._model = model
        self._linear: dict[int, tuple[Any, Linear | None]] = {}
        self._periods: dict[int, Linear | None] = {}  # by index of the period in `days`
        prices = model.prices
        # The UTC days its prices change on; None when they change by time of day too.
        self.days: list[int] | None = []
        if not isinstance(prices, types.ModelPrice):
            if all(
                c.constraint is None or isinstance(c.constraint, types.StartDateConstraint)
                for c in prices
            ):
                self.days = sorted(
                    {(c.constraint.start_date - _EPOCH).days for c in prices if c.constraint}
                )
            else:
                self.days = None

    def linear_on(self, day: int) -> Linear | None:
        """The `linear` of the prices in force on a UTC day (prices that change by date only:
        `days` is not None), kept per period between the days they change on."""
        assert self.days is not None
        period = bisect_right(self.days, day)
        if period not in self._periods:
            self._periods[period] = self.linear(self.price_at(day * DAY_US))
        return self._periods[period]

    def price_at(self, timestamp_us: int) -> Any:
        """The prices in force at that moment (step 1)."""
        return self._model.get_prices(datetime.fromtimestamp(timestamp_us / 1e6, UTC))

    def linear(self, price: Any) -> Linear | None:
        """The price's coefficients, or None: priced per call (`cents`)."""
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


def cents(price: Any, inputs: int, cached: int, outputs: int) -> Decimal | None:
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
    constant = _units(cents(price, 0, 0, 0))
    if constant is None:
        return None
    slopes = []
    for low in (0, *(start + 1 for start in starts)):
        i = max(low, 1)
        base = _units(cents(price, i, 0, 0))
        read = _units(cents(price, i, 1, 0))
        out = _units(cents(price, i, 0, 1))
        if base is None or read is None or out is None or (base - constant) % i:
            return None
        slopes.append(((base - constant) // i, read - base, out - base))
    strict = cents(price, 0, 1, 0) is None
    linear = Linear(constant, tuple(starts), tuple(slopes), strict)
    # The check: another call of every tier, against the catalogue.
    for low in (0, *(start + 1 for start in starts)):
        i, c, o = low + 7, 3, 11
        if linear.exact(i, c, o) != _units(cents(price, i, c, o)):
            return None
    return linear


def _units(cents: Decimal | None) -> int | None:
    """Cents as integer units, or None when they are not a whole number of them."""
    if cents is None:
        return None
    units = cents * UNITS_PER_CENT
    return int(units) if units == units.to_integral_value() else None
