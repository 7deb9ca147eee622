"""What a deployment sets of the domain's rules: the limits every event is held to
(`EventRules`), the compressions an edge's columnar records may take, and for OTLP trace
exports which span attributes name a usage span's customer (`Customers`) and the price table
that costs its event (`Prices`).

Plain data importing only the standard library: every `meterline` command shows these defaults
in its options, and reads them without loading the validators and formats they configure
(`meters.events`, `meters.columnar`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meters.events.otlp import Value


@dataclass(frozen=True, slots=True)
class EventRules:
    """Limits applied to every event; configurable per deployment."""

    max_future: timedelta = timedelta(minutes=5)
    max_name_length: int = 128
    max_id_length: int = 512
    max_metadata_keys: int = 50
    max_metadata_key_length: int = 40
    max_metadata_string_length: int = 500


# Of an edge's columnar records, whole (`meters.columnar`).
COMPRESSIONS = ("zstd", "lz4", "none")


# The customer attributes by default, and the event field each gives.
CUSTOMERS = {
    "meterline.customer.external_id": "external_customer_id",
    "meterline.customer.id": "customer_id",
}


@dataclass(frozen=True, slots=True)
class Customers:
    """Which attributes name a span's customer, in order, and the event field each gives
    (`external_customer_id` or `customer_id`)."""

    attributes: Mapping[str, str] = field(default_factory=lambda: dict(CUSTOMERS))

    def of(self, attributes: Mapping[str, Value]) -> tuple[str, str] | None:
        for name, to in self.attributes.items():
            value = attributes.get(name)
            if value is not None and value != "" and type(value) is not bool:
                return to, str(value)
        return None


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """Cents per token. Cache reads and writes cost `input` when the table gives no price."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_creation: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Prices:
    """A price table: the `_cost` of a span's event from its model and tokens, exact, with the
    table's `version` on the event (`priceTable`). A model it does not list has no cost."""

    version: str
    models: Mapping[str, ModelPrices]
    currency: str = "usd"

    @classmethod
    def parse(cls, value: Any) -> Prices:
        """From the JSON document (`--otlp-prices`); ValueError naming what is wrong."""
        if type(value) is not dict or type(value.get("version")) is not str:
            raise ValueError('a price table is {"version": "...", "models": {...}}')
        models = {}
        for model, prices in (value.get("models") or {}).items():
            if type(prices) is not dict or not {"input", "output"} <= prices.keys():
                raise ValueError(f"models.{model}: needs input and output (cents per token)")
            found = {}
            for name in ("input", "output", "cached_input", "cache_creation"):
                if prices.get(name) is not None:
                    found[name] = _price(prices[name], f"models.{model}.{name}")
            models[model] = ModelPrices(**found)
        return cls(value["version"], models, str(value.get("currency") or "usd"))

    def cost(self, model: str, tokens: Mapping[str, Any]) -> Decimal | None:
        """The cost of a span's tokens (`inputTokens` including cache reads and writes, as the
        conventions count them), or None for a model not in the table or counts that are not."""
        prices = self.models.get(model)
        counts = [tokens.get(k) or 0 for k in _COUNTED]
        if prices is None or any(type(c) is not int or c < 0 for c in counts):
            return None
        inputs, outputs, reads, writes = counts
        read_price = prices.input if prices.cached_input is None else prices.cached_input
        write_price = prices.input if prices.cache_creation is None else prices.cache_creation
        plain = max(inputs - reads - writes, 0)
        return (
            plain * prices.input
            + reads * read_price
            + writes * write_price
            + outputs * prices.output
        )


_COUNTED = ("inputTokens", "outputTokens", "cachedInputTokens", "cacheCreationInputTokens")
# `_cost.amount` is Decimal(17, 12): a price of at most 12 places times a count stays exact.
_PLACES = 12


def _price(value: Any, where: str) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{where}: {value!r} is not a decimal") from None
    exponent = price.as_tuple().exponent
    if not price.is_finite() or price < 0 or (isinstance(exponent, int) and -exponent > _PLACES):
        raise ValueError(f"{where}: a price is >= 0 with at most {_PLACES} decimal places")
    return price
