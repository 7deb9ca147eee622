"""Usage events: declared once (`schema`), checked by the exact validator (`exact`, the
reference, which locates every error) and by the compiled one (`compiled`, the fast path)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pyarrow as pa

from meters.errors import FieldError, ValidationFailed
from meters.events import priced
from meters.events.compiled import validator
from meters.events.exact import parse_ingest_body
from meters.events.schema import (
    COLUMNS,
    EVENT_FIELDS,
    LLM_KEY,
    MAX_ERRORS,
    NUMBER_LIMIT,
    PRICE_TABLE,
    Event,
    to_table,
)
from meters.events.usage import parse_cost_amount
from meters.pricing import Pricing
from meters.settings import EventRules

__all__ = [
    "COLUMNS",
    "EVENT_FIELDS",
    "MAX_ERRORS",
    "NUMBER_LIMIT",
    "Event",
    "EventRules",
    "decode_json",
    "parse_cost_amount",
    "parse_ingest_body",
    "to_table",
    "validate_body",
    "validate_exact",
]


def validate_body(
    body: bytes,
    *,
    now: int,
    rules: EventRules,
    pricing: Pricing | None = None,
    unpriced: Counter[str] | None = None,
) -> pa.Table:
    """The events of a `{"events": [...]}` JSON body as `COLUMNS`; raises ValidationFailed
    listing every error (`json_invalid` for a body that is not JSON). With `pricing`, its
    `_llm` events without `_cost` are priced (`priced`); those it could not price are counted
    into `unpriced`."""
    columns = validator(rules)(body, now, pricing, unpriced)
    if columns is not None:
        return columns
    return validate_exact(
        decode_json(body), now=now, rules=rules, pricing=pricing, unpriced=unpriced
    )


def validate_exact(
    body: Any,
    *,
    now: int,
    rules: EventRules,
    pricing: Pricing | None = None,
    unpriced: Counter[str] | None = None,
) -> pa.Table:
    """`validate_body` by the exact validator alone, of a decoded body (what it falls back to
    when the compiled one is not sure)."""
    events = parse_ingest_body(body, now=now, rules=rules)
    if pricing is None:
        return to_table(events)
    candidates = priced.Candidates()
    for i, event in enumerate(events):
        llm = event.metadata.get(LLM_KEY)
        if llm is not None and event.cost_amount is None:
            candidates.add(i, llm)
    found = candidates.price([e.timestamp_us for e in events], pricing)
    for row in found.rows:
        events[row].metadata.pop(PRICE_TABLE, None)
    if unpriced is not None:
        unpriced.update(found.unpriced)
    table = to_table(events)
    at = table.schema.get_field_index
    metadata, costs = found.into(
        table.column("metadata").combine_chunks(), table.column("cost_amount").combine_chunks()
    )
    return table.set_column(at("metadata"), "metadata", metadata).set_column(
        at("cost_amount"), "cost_amount", costs
    )


def decode_json(body: bytes) -> Any:
    """Decode JSON; 422 (json_invalid) otherwise. orjson rejects NaN, Infinity and numbers
    that overflow a double."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationFailed(
            [FieldError("json_invalid", ("body",), f"JSON decode error: {exc}", None)]
        ) from None
