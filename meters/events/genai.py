"""GenAI spans (OpenTelemetry's semantic conventions for generative AI) as usage events, with
the metadata `LLMStrategy` writes for the same call, so that one meter counts both.

1. A span is a usage span when it reports tokens (`USAGE`); any other span is only read for
   the customer it names, and only for the attributes below (`wanted`).
2. Its customer is the first customer attribute (`Customers`) found on the span, else on its
   nearest ancestor in the same request that has one, else on its resource. A usage span
   without one is not an event: it is counted (`Converted.no_customer`) and refused.
3. Its event (`event`): `external_id` `otel:<trace id>:<span id>`, so an exporter that sends
   a request again adds nothing; `timestamp` the span's end; `parent_id` the parent span's
   event when the parent is a usage span of the same request; `name` `gen_ai.<operation>`;
   the metadata from `FIELDS` (the attribute each field is read from, first found wins);
   with a price table (`Prices`), `_cost` from the model and the tokens, and the table's
   version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from meters.events.otlp import Resource, Span, Value, Wanted

# An LLMStrategy metadata field (and `_llm`'s), and the span attributes it is read from: the
# current convention's name first, then older or other instrumentations' spellings.
FIELDS: dict[str, tuple[str, ...]] = {
    "provider": ("gen_ai.provider.name", "gen_ai.system"),
    "operation": ("gen_ai.operation.name",),
    "model": ("gen_ai.request.model", "gen_ai.response.model"),
    "responseModel": ("gen_ai.response.model",),
    "inputTokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
    "outputTokens": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
    "cachedInputTokens": (
        "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.cache_read_input_tokens",
    ),
    "cacheCreationInputTokens": (
        "gen_ai.usage.cache_creation.input_tokens",
        "gen_ai.usage.cache_creation_input_tokens",
    ),
}
USAGE = FIELDS["inputTokens"] + FIELDS["outputTokens"]
# LLMStrategy's vendor is the client package and the API called; a span names the provider and
# the operation, which is the same name but for Anthropic's messages API.
VENDORS = {("anthropic", "chat"): "anthropic.messages"}
EXTERNAL_ID_PREFIX = "otel:"
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

    def wanted(self) -> Wanted:
        return Wanted(("gen_ai.",), frozenset(self.attributes))

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


@dataclass(slots=True)
class Converted:
    events: list[dict[str, Any]]
    spans: int = 0  # read
    # The events of usage spans without a customer (refused; kept for the dead letters).
    unowned: list[dict[str, Any]] = field(default_factory=list)

    @property
    def no_customer(self) -> int:
        return len(self.unowned)


def usage_events(
    resources: list[Resource], customers: Customers, prices: Prices | None = None
) -> Converted:
    """Step 1 to 3 for one export request."""
    where = {s.span_id: (s, r) for r in resources for s in r.spans}
    usage = {s.span_id for s, _ in where.values() if any(k in s.attributes for k in USAGE)}
    found = Converted([], spans=len(where))
    for span_id in usage:
        span, resource = where[span_id]
        customer = _customer(span, resource, where, customers)
        parent = span.parent_span_id if span.parent_span_id in usage else None
        made = event(span, customer, parent, prices)
        (found.events if customer is not None else found.unowned).append(made)
    found.events.sort(key=lambda e: e["external_id"])  # one order, whatever the set's
    return found


def event(
    span: Span, customer: tuple[str, str] | None, parent: str | None, prices: Prices | None = None
) -> dict[str, Any]:
    """Step 3: the event of one usage span (without a customer: as a dead letter shows it)."""
    read = {name: _first(span.attributes, names) for name, names in FIELDS.items()}
    provider, operation = str(read["provider"] or "unknown"), str(read["operation"] or "chat")
    vendor = VENDORS.get((provider, operation), f"{provider}.{operation}")
    model = str(read["model"] or "unknown")
    inputs, outputs = _tokens(read["inputTokens"]), _tokens(read["outputTokens"])
    cached = read["cachedInputTokens"]
    llm: dict[str, Any] = {"vendor": vendor, "model": model, "input_tokens": inputs}
    measured: dict[str, Any] = {"vendor": vendor, "model": model, "inputTokens": inputs}
    if cached is not None:  # left out when the span does not say, rather than claimed 0
        llm["cached_input_tokens"] = measured["cachedInputTokens"] = _tokens(cached)
    total = inputs + outputs if type(inputs) is int and type(outputs) is int else None
    llm |= {"output_tokens": outputs, "total_tokens": total}
    measured |= {"outputTokens": outputs, "totalTokens": total, "strategy": "OTLP"}
    measured["_llm"] = llm
    if read["responseModel"] is not None:
        measured["responseModel"] = str(read["responseModel"])
    if read["cacheCreationInputTokens"] is not None:
        measured["cacheCreationInputTokens"] = _tokens(read["cacheCreationInputTokens"])
    if prices is not None and (cost := prices.cost(model, measured)) is not None:
        measured["_cost"] = {"amount": str(cost), "currency": prices.currency}
        measured["priceTable"] = prices.version
    made: dict[str, Any] = {
        "name": f"gen_ai.{operation}",
        "external_id": external_id(span.trace_id, span.span_id),
        "metadata": measured,
    }
    if customer is not None:
        made[customer[0]] = customer[1]
    if span.end_unix_nano:
        ended = datetime.fromtimestamp(span.end_unix_nano // 1000 / 1e6, UTC)
        made["timestamp"] = ended.isoformat().replace("+00:00", "Z")
    if parent is not None:
        made["parent_id"] = external_id(span.trace_id, parent)
    return made


def external_id(trace_id: str, span_id: str) -> str:
    return f"{EXTERNAL_ID_PREFIX}{trace_id}:{span_id}"


def _customer(
    span: Span, resource: Resource, where: dict[str, tuple[Span, Resource]], customers: Customers
) -> tuple[str, str] | None:
    seen, at = set(), span
    while True:
        found = customers.of(at.attributes)
        if found is not None:
            return found
        seen.add(at.span_id)
        parent = where.get(at.parent_span_id)
        if parent is None or parent[0].span_id in seen:  # the root, or a cycle a client sent
            return customers.of(resource.attributes)
        at = parent[0]


def _first(attributes: Mapping[str, Value], names: tuple[str, ...]) -> Value | None:
    for name in names:
        if name in attributes:
            return attributes[name]
    return None


def _tokens(value: Value | None) -> Any:
    """A count as the span has it (a double that is a whole number as an integer; none is 0):
    one that is not a count is kept, for the `_llm` rules to refuse with its place."""
    if value is None:
        return 0
    return int(value) if type(value) is float and value.is_integer() else value
