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
from typing import Any

from meters.events.otlp import Resource, Span, Value, Wanted
from meters.events.schema import PRICE_TABLE
from meters.settings import Customers, Prices

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


def wanted_of(customers: Customers) -> Wanted:
    """What the decoder reads of spans (`meters.events.otlp`): the GenAI attributes and the
    customer's."""
    return Wanted(("gen_ai.",), frozenset(customers.attributes))


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
        measured[PRICE_TABLE] = prices.version
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
