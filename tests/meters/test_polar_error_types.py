"""Every ingest validation rule's error `type` against Polar's, field by field.

Each row is a body that breaks one rule. Where Polar refuses it too (its own declarations,
`tests.polar.event_schema`, validated as FastAPI validates them), meterline's first error has
Polar's type, at the field Polar names or below it (Polar reports a NUL anywhere in metadata at
`metadata`; meterline at the key). Where only meterline refuses it (the rows marked `STRICTER`:
the docs page "How it differs from Polar", docs/reference/polar.md), its type is pydantic's for
that kind of rule or one of the few meterline types that page lists, so a client only ever meets
documented types.
Rules Polar checks in its service rather than its schema (organization, member) carry the types
Polar's `event/service.py` writes.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic_core.core_schema import ErrorType

from meters.errors import ValidationFailed
from meters.events import EventRules, parse_ingest_body
from meters.times import now_us
from tests.polar import event_schema as polar

POLAR_PAGE = Path(__file__).parents[2] / "docs" / "reference" / "polar.md"
EVENT = {"name": "e", "external_customer_id": "c"}
LLM = {"vendor": "v", "model": "m", "input_tokens": 1, "output_tokens": 1, "total_tokens": 2}


def _event(**fields: Any) -> dict[str, Any]:
    return {"events": [{**EVENT, **fields}]}


def _metadata(**metadata: Any) -> dict[str, Any]:
    return _event(metadata=metadata)


def _cost(**cost: Any) -> dict[str, Any]:
    return _metadata(_cost={"amount": 1, "currency": "usd", **cost})


def _llm(**llm: Any) -> dict[str, Any]:
    return _metadata(_llm={k: v for k, v in {**LLM, **llm}.items() if v is not _DROP})


_DROP = object()

# Polar refuses these too: meterline's type must be Polar's.
SAME: dict[str, Any] = {
    "body not an object": [],
    "events missing": {},
    "events not a list": {"events": "x"},
    "event not an object": {"events": [1]},
    "name missing": {"events": [{"external_customer_id": "c"}]},
    "name not a string": _event(name=1),
    "name over 128": _event(name="x" * 129),
    "name with NUL": _event(name="a\x00"),
    "no customer": {"events": [{"name": "e"}]},
    "external_customer_id not a string": _event(external_customer_id=5),
    "customer_id not a string": {"events": [{"name": "e", "customer_id": 5}]},
    "customer_id not a UUID": {"events": [{"name": "e", "customer_id": "nope"}]},
    "customer_id not version 4": {"events": [{"name": "e", "customer_id": str(uuid.uuid1())}]},
    "external_id not a string": _event(external_id=5),
    "parent_id not a string": _event(parent_id=5),
    "external_member_id not a string": _event(external_member_id=5),
    "timestamp not a datetime": _event(timestamp="garbage"),
    "timestamp naive": _event(timestamp="2024-01-01T00:00:00"),
    "timestamp a boolean": _event(timestamp=True),
    "timestamp a list": _event(timestamp=[1]),
    "timestamp epoch beyond 9999": _event(timestamp=1e17),
    "timestamp epoch infinite": _event(timestamp=float("inf")),
    "timestamp in the future": _event(timestamp="2999-01-01T00:00:00Z"),
    "timestamp epoch ms in the future": _event(timestamp=1e14),
    "metadata not an object": _event(metadata=[1]),
    "metadata value null": _metadata(k=None),
    "metadata value a list": _metadata(k=[1]),
    "metadata value an object": _metadata(k={"a": 1}),
    "metadata string empty": _metadata(k=""),
    "metadata string over 500": _metadata(k="x" * 501),
    "metadata string with NUL": _metadata(k="a\x00"),
    "_cost not an object": _metadata(_cost="x"),
    "_cost.amount missing": _metadata(_cost={"currency": "usd"}),
    "_cost.amount not a number": _cost(amount="abc"),
    "_cost.amount a boolean": _cost(amount=True),
    "_cost.amount a list": _cost(amount=[1]),
    "_cost.amount 13 places": _cost(amount="0.0000000000001"),
    "_cost.amount 6 whole digits": _cost(amount=123456),
    "_cost.amount NaN": _cost(amount="NaN"),
    "_cost.currency USD": _cost(currency="USD"),
    "_cost.currency not a string": _cost(currency=5),
    "_cost.currency missing": _metadata(_cost={"amount": 1}),
    "_llm not an object": _metadata(_llm="x"),
    "_llm.vendor missing": _llm(vendor=_DROP),
    "_llm.vendor not a string": _llm(vendor=5),
    "_llm.model not a string": _llm(model=[]),
    "_llm.prompt not a string": _llm(prompt=5),
    "_llm.total_tokens missing": _llm(total_tokens=_DROP),
    "_llm tokens fractional": _llm(input_tokens=1.5),
    "_llm tokens not numeric": _llm(output_tokens="abc"),
    "_llm tokens null": _llm(total_tokens=None),
    "_llm tokens a list": _llm(input_tokens=[1]),
    "_llm cached tokens not numeric": _llm(cached_input_tokens="abc"),
}

# Polar accepts these; meterline refuses them (each a row of docs/reference/polar.md).
STRICTER: dict[str, Any] = {
    "unknown body field": {"events": [], "x": 1},
    "unknown event field": _event(x=1),
    "name empty": _event(name=""),
    "both customer ids": {"events": [{**EVENT, "customer_id": str(uuid.uuid4())}]},
    "external_customer_id empty": _event(external_customer_id=""),
    "external_id empty": _event(external_id=""),
    "external_id over 512": _event(external_id="x" * 513),
    "parent_id empty": _event(parent_id=""),
    "member_id on an external customer": _event(member_id=str(uuid.uuid4())),
    "timestamp before year 1 Jan 2": _event(timestamp="0001-01-01T00:00:00Z"),
    "metadata over 50 keys": _event(metadata={f"k{i}": 1 for i in range(51)}),
    "metadata key over 40": _metadata(**{"k" * 41: 1}),
    "metadata key with a dot": _metadata(**{"a.b": 1}),
    "metadata number NaN": _metadata(k=float("nan")),
    "metadata number beyond 2^63": _metadata(k=2**70),
    "_cost.currency containing usd": _cost(currency="xusdx"),
    "_cost unknown field": _cost(x=1),
    "_llm unknown field": _llm(x=1),
    "_llm.vendor empty": _llm(vendor=""),
    "_llm tokens negative": _llm(input_tokens=-1),
    "_llm tokens beyond 2^63": _llm(input_tokens=2**63),
    "_llm tokens a numeric string": _llm(input_tokens="3"),
    "_llm tokens an integral float": _llm(input_tokens=3.0),
    "_llm tokens a boolean": _llm(input_tokens=True),
}

# Polar's service checks, by the type its `event/service.py` writes for each.
SERVICE: dict[str, tuple[dict[str, Any], str]] = {
    "organization_id with an organization token": (
        _event(organization_id=str(uuid.uuid4())),
        "organization_token",
    ),
    "member_id": (
        {
            "events": [
                {"name": "e", "customer_id": str(uuid.uuid4()), "member_id": str(uuid.uuid4())}
            ]
        },
        "member_id",
    ),
}


def _first_error(body: Any) -> tuple[str, tuple[str | int, ...]]:
    with pytest.raises(ValidationFailed) as refused:
        parse_ingest_body(body, now=now_us(), rules=EventRules())
    first = refused.value.errors[0]
    return first.type, first.loc


@pytest.mark.parametrize("case", sorted(SAME))
def test_polar_refuses_it_and_meterline_answers_polars_type(case: str) -> None:
    body = SAME[case]
    type_, loc = _first_error(body)
    theirs = polar.errors(body)
    assert theirs is not None, f"Polar accepts {case!r}: move it to STRICTER"
    at_or_above = [t for t, at in theirs if loc[: len(at)] == at]
    assert at_or_above, (case, loc, theirs)
    assert type_ == at_or_above[0], (case, loc, theirs)


def _documented_types() -> set[str]:
    """The meterline-only error types the docs page "How it differs from Polar" names."""
    section = POLAR_PAGE.read_text().split("# How it differs from Polar", 1)[1]
    paragraph = section.split("Error types meterline alone uses:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", paragraph))


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_only_meterline_refuses_it_with_a_documented_type(case: str) -> None:
    body = STRICTER[case]
    type_, _ = _first_error(body)
    assert polar.errors(body) is None, f"Polar refuses {case!r} too: move it to SAME"
    polars_own = {theirs for _, theirs in SERVICE.values()}
    assert type_ in set(get_args(ErrorType)) | polars_own | _documented_types(), (case, type_)


@pytest.mark.parametrize("case", sorted(SERVICE))
def test_rules_polar_checks_in_its_service_have_its_types(case: str) -> None:
    body, theirs = SERVICE[case]
    assert polar.errors(body) is None  # past Polar's schema, to its service's check
    assert _first_error(body)[0] == theirs


def test_every_meterline_only_type_listed_is_one_it_uses() -> None:
    used = {_first_error(body)[0] for body in STRICTER.values()}
    assert _documented_types() <= used | {"customer_not_found", "meter_not_found"}
