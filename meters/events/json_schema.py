"""The JSON record format (`meters.records`) as a JSON Schema (draft 2020-12), generated from the
event's one declaration (`schema.py`, `usage.py`) so that it cannot drift from the validators.

The schema accepts what the validators accept, except for the rules it cannot express
(`runtime_rules`): those are checked only when the record is applied, and named beside it.
"""

from __future__ import annotations

from typing import Any

from meters.events.schema import (
    COST_KEY,
    EVENT_FIELDS,
    ID_FIELDS,
    LLM_KEY,
    NUMBER_LIMIT,
)
from meters.events.usage import (
    COST_FIELDS,
    COST_PLACES,
    COST_WHOLE_DIGITS,
    LLM_FIELDS,
    LLM_STRING_LENGTH,
    LLM_TOKENS,
)
from meters.settings import EventRules
from meters.times import MAX_TS_US, MIN_TS_US

Schema = dict[str, Any]
# Fields of a record beyond the event's (`records.py`: organization_id is required there).
RECORD_FIELDS = ("organization_id", "ingested_at")
NO_NUL = "^[^\\u0000]*$"
_HEX = "[0-9a-fA-F]"
# ISO 8601 date-times with a time and a timezone (a date, any separator, hours, …, an offset),
# loosely: fromisoformat decides the rest (runtime_rules).
_ZONED = (
    "^[0-9]{4}(-?[0-9]{2}-?[0-9]{2}|-?W[0-9]{2}(-?[0-9])?).[0-9]{2}[^\\u0000]*"
    "(Z|[+-][0-9]{2}(:?[0-9]{2}(:?[0-9]{2}([.,][0-9]+)?)?)?)$"
)
_DECIMAL_TEXT = "^\\s*[+-]?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][+-]?[0-9]+)?\\s*$"
_US_PER_MS = 1000


def record_schema(rules: EventRules) -> Schema:
    """The schema of a JSON record's value under `rules`."""
    ids = {f: _nullable(_text(1, rules.max_id_length)) for f in ID_FIELDS}
    properties: Schema = {
        "organization_id": _uuid(_HEX, _HEX) | {"description": "an existing organization"},
        "ingested_at": _nullable(_zoned()) | {"description": "default: the record's timestamp"},
        "name": _text(1, rules.max_name_length),
        "timestamp": {
            "description": "ISO 8601 with a timezone, or epoch seconds (milliseconds beyond"
            " 2e10); null: now; absent: ingested_at",
            "anyOf": [_zoned(), _epoch(), {"type": "null"}],
        },
        "customer_id": _nullable(_uuid("4", "[89abAB]")),
        **ids,
        "metadata": _nullable(_metadata(rules)),
        "member_id": {"type": "null", "description": "members are not supported"},
    }
    assert set(properties) == EVENT_FIELDS | set(RECORD_FIELDS), "the declaration changed"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "meterline JSON record (topic meterline.events)",
        "description": "Also checked when applied: " + "; ".join(runtime_rules(rules)),
        "type": "object",
        "required": ["organization_id", "name"],
        "additionalProperties": False,
        "properties": properties,
        # Exactly one of the two customer references, not null.
        "oneOf": [
            {"required": [f], "properties": {f: {"type": "string"}}}
            for f in ("customer_id", "external_customer_id")
        ],
    }


def runtime_rules(rules: EventRules) -> list[str]:
    """What the core checks beyond the schema: rules about stored state, the clock, and
    what JSON Schema cannot count or parse."""
    return [
        "the value is UTF-8 JSON of at most the core's record size limit (1 MiB by default)",
        "organization_id names an existing organization",
        "customer_id names an existing customer of that organization",
        f"timestamp is at most {rules.max_future.total_seconds():g} seconds in the future"
        " (the server's --max-future-seconds) and within the years 1 to 9999",
        "timestamp and ingested_at text is a date-time Python's datetime.fromisoformat reads"
        " (RFC 3339 always is), with a real calendar date",
        "_llm token counts are written as integers (3, not 3.0: JSON Schema's integer is a"
        " value, not a spelling)",
        f"_cost.amount has at most {COST_WHOLE_DIGITS} whole digits and {COST_PLACES} decimal"
        " places, counted on the exact decimal",
    ]


def _text(low: int, high: int | None) -> Schema:
    found: Schema = {"type": "string", "minLength": low, "pattern": NO_NUL}
    return found if high is None else found | {"maxLength": high}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _uuid(version: str, variant: str) -> Schema:
    """The spellings of a UUID that Python's uuid.UUID reads and are worth writing: hyphens
    optional, braces, a urn: prefix, any case."""
    body = f"{_HEX}{{8}}-?{_HEX}{{4}}-?{version}{_HEX}{{3}}-?{variant}{_HEX}{{3}}-?{_HEX}{{12}}"
    return {"type": "string", "pattern": f"^(urn:uuid:)?(\\{{{body}\\}}|{body})$"}


def _zoned() -> Schema:
    return {"type": "string", "format": "date-time", "pattern": _ZONED}


def _epoch() -> Schema:
    # Epoch seconds up to 2e10 all fall within the years 1 to 9999; beyond, milliseconds do
    # up to these bounds.
    return {
        "type": "number",
        "minimum": MIN_TS_US // _US_PER_MS,
        "maximum": MAX_TS_US // _US_PER_MS,
    }


def _metadata(rules: EventRules) -> Schema:
    number = {"type": "number", "minimum": -NUMBER_LIMIT, "exclusiveMaximum": NUMBER_LIMIT}
    return {
        "type": "object",
        "maxProperties": rules.max_metadata_keys,
        # No '.': meter paths split on it.
        "propertyNames": {
            "minLength": 1,
            "maxLength": rules.max_metadata_key_length,
            "pattern": "^[^.\\u0000]*$",
        },
        "properties": {COST_KEY: _cost(), LLM_KEY: _llm()},
        "additionalProperties": {
            "anyOf": [_text(1, rules.max_metadata_string_length), {"type": "boolean"}, number]
        },
    }


def _cost() -> Schema:
    bound = 10**COST_WHOLE_DIGITS
    assert {"amount", "currency"} == COST_FIELDS
    return {
        "type": "object",
        "description": "an amount in cents",
        "required": sorted(COST_FIELDS),
        "additionalProperties": False,
        "properties": {
            "amount": {
                "anyOf": [
                    {"type": "number", "exclusiveMinimum": -bound, "exclusiveMaximum": bound},
                    {"type": "string", "pattern": _DECIMAL_TEXT},
                ]
            },
            "currency": {"const": "usd"},
        },
    }


def _llm() -> Schema:
    tokens = {"type": "integer", "minimum": 0, "exclusiveMaximum": NUMBER_LIMIT}
    properties: Schema = {
        "vendor": _text(1, LLM_STRING_LENGTH),
        "model": _text(1, LLM_STRING_LENGTH),
        "prompt": _nullable(_text(0, None)),
        "response": _nullable(_text(0, None)),
        **dict.fromkeys(LLM_TOKENS, tokens),
        "cached_input_tokens": _nullable(tokens),
    }
    assert set(properties) == LLM_FIELDS, "the declaration changed"
    return {
        "type": "object",
        "required": ["vendor", "model", *LLM_TOKENS],
        "additionalProperties": False,
        "properties": properties,
    }
