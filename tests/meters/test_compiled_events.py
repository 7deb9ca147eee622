"""The compiled validator agrees with the exact one: the same columns for every valid body, and
never a body the exact validator refuses."""

from __future__ import annotations

import copy
import json
from collections import Counter
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meters.errors import ValidationFailed
from meters.events import (
    EventRules,
    parse_ingest_body,
    to_table,
    validate_body,
    validate_exact,
)
from meters.events.compiled import validator
from meters.pricing import Pricing
from tests.meters.test_events import RULE_TABLE, Rule
from tests.strategies import NOW_US, cost_amounts, valid_events

RULES = EventRules()


def _body(events: list[Any]) -> bytes:
    """The JSON text a client would send. The standard library's: it writes what orjson
    refuses or rewrites (integers past 64 bits; NaN, which orjson writes as null)."""
    return json.dumps({"events": events}, ensure_ascii=False).encode()


def _compiled(events: list[Any]) -> pa.Table | None:
    return validator(RULES)(_body(events), NOW_US)


def _exact(body: bytes) -> pa.Table | None:
    """The exact validator's columns of what the HTTP path decodes `body` to (orjson reads
    an integer past 64 bits as a float: that float is what both validators must judge)."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    try:
        return to_table(parse_ingest_body(decoded, now=NOW_US, rules=RULES))
    except ValidationFailed:
        return None


def _same(compiled: pa.Table, exact: pa.Table) -> None:
    """Equal columns; metadata compared as JSON values (the encoders may space numbers
    differently, e.g. 1e+16 and 1e16)."""
    assert compiled.schema == exact.schema
    for name in compiled.column_names:
        left, right = compiled.column(name).to_pylist(), exact.column(name).to_pylist()
        if name == "metadata":
            left, right = [orjson.loads(v) for v in left], [orjson.loads(v) for v in right]
        assert left == right, name


@st.composite
def _amounts_any_spelling(draw: st.DrawFn) -> Any:
    """Valid amounts, some in spellings only the exact path reads (" 12.5", "+5", "1E+2").

    Foreign digits are left to test_cost_amount_in_foreign_digits_is_canonical_or_rejected.
    """
    amount = draw(cost_amounts())
    if isinstance(amount, str) and draw(st.booleans()):
        spell = draw(st.sampled_from(["padded", "plus", "exponent"]))
        if spell == "padded":
            return f" {amount}\t"
        if spell == "plus":
            return "+" + amount
        return f"{Decimal(amount).normalize():E}"
    return amount


@st.composite
def _events_any_spelling(draw: st.DrawFn) -> dict[str, Any]:
    """Valid events, some spelled the way only the exact path accepts (upper-case UUID, ...)."""
    event = draw(valid_events())
    if isinstance(event.get("customer_id"), str) and draw(st.booleans()):
        event["customer_id"] = draw(
            st.sampled_from(
                [
                    event["customer_id"].upper(),
                    "{" + event["customer_id"] + "}",
                    "urn:uuid:" + event["customer_id"],
                    event["customer_id"].replace("-", ""),
                ]
            )
        )
    if draw(st.booleans()):
        metadata = event["metadata"] = dict(event.get("metadata") or {})
        while len(metadata) >= RULES.max_metadata_keys:
            metadata.pop(next(iter(metadata)))
        metadata["_cost"] = {"amount": draw(_amounts_any_spelling()), "currency": "usd"}
    return event


@given(st.lists(_events_any_spelling(), min_size=1, max_size=5))
def test_compiled_agrees_with_exact_on_valid_bodies(events: list[dict[str, Any]]) -> None:
    exact = _exact(_body(events))
    assert exact is not None
    compiled = _compiled(events)
    if compiled is not None:
        _same(compiled, exact)
    _same(validate_body(_body(events), now=NOW_US, rules=RULES), exact)


@pytest.mark.parametrize("rule", RULE_TABLE, ids=lambda rule: rule.id)
@given(data=st.data())
def test_compiled_never_accepts_a_broken_event(rule: Rule, data: st.DataObject) -> None:
    events = data.draw(st.lists(valid_events(), min_size=1, max_size=3), label="events")
    broken = data.draw(st.integers(0, len(events) - 1), label="broken")
    item = events[broken] = copy.deepcopy(events[broken])
    rule.breaker(item, data)
    compiled = _compiled(events)
    exact = _exact(_body(events))
    if exact is not None:  # the JSON round trip made it valid (a huge integer became a float)
        assert compiled is None or _same(compiled, exact) is None
        return
    assert compiled is None
    with pytest.raises(ValidationFailed):
        validate_body(_body(events), now=NOW_US, rules=RULES)


def test_compiled_reads_the_benchmark_event() -> None:
    """The common case takes the compiled path (else the speed is the exact validator's)."""
    event = {
        "name": "llm_completion",
        "external_customer_id": "cust_0001",
        "external_id": "req-1",
        "timestamp": "2025-05-31T11:00:00.123456+00:00",
        "metadata": {
            "_llm": {
                "vendor": "openai",
                "model": "gpt-4o-mini",
                "input_tokens": 812,
                "output_tokens": 194,
                "total_tokens": 1006,
                "cached_input_tokens": 0,
            },
            "_cost": {"amount": "0.03710000", "currency": "usd"},
            "route": "/v1/chat",
            "streamed": True,
        },
    }
    compiled = _compiled([event])
    assert compiled is not None
    exact = _exact(_body([event]))
    assert exact is not None
    _same(compiled, exact)


@st.composite
def _llm_events(draw: st.DrawFn) -> dict[str, Any]:
    """Valid events, some with an `_llm` of a catalogue model, an override's or an unknown
    one, and some of those with a `_cost` (which pricing keeps)."""
    event = draw(_events_any_spelling())
    if draw(st.booleans()):
        metadata = event["metadata"] = dict(event.get("metadata") or {})
        while len(metadata) >= RULES.max_metadata_keys - 1:
            metadata.pop(next(iter(metadata)))
        vendor, model = draw(
            st.sampled_from([("openai", "gpt-4o"), ("acme", "house"), ("nobody", "x")])
        )
        inputs, outputs = draw(st.integers(0, 10**7)), draw(st.integers(0, 10**6))
        llm = {"vendor": vendor, "model": model, "input_tokens": inputs, "output_tokens": outputs}
        llm["total_tokens"] = inputs + outputs
        if draw(st.booleans()):
            llm["cached_input_tokens"] = draw(st.integers(0, inputs))
        metadata["_llm"] = llm
        if draw(st.booleans()):
            metadata["priceTable"] = "the client's"
    return event


@given(st.lists(_llm_events(), min_size=1, max_size=5))
def test_both_paths_price_alike(events: list[dict[str, Any]]) -> None:
    """With pricing, the compiled path (when it decides) stores what the exact one does, and
    counts the same unpriced models."""
    house = {"input": "0.001", "output": "0.002"}
    pricing = Pricing.of(
        {"catalog": True, "markup_percent": "7.5", "overrides": {"acme/house": house}}
    )
    body = _body(events)
    compiled_unpriced: Counter[str] = Counter()
    compiled = validator(RULES)(body, NOW_US, pricing, compiled_unpriced)
    exact_unpriced: Counter[str] = Counter()
    exact = validate_exact(
        orjson.loads(body), now=NOW_US, rules=RULES, pricing=pricing, unpriced=exact_unpriced
    )
    if compiled is not None:
        _same(compiled, exact)
        assert compiled_unpriced == exact_unpriced
