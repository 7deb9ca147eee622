"""A meter's `dimensions` as requests give them (`meters.definitions`): metadata property paths
read as a filter clause's property is, kept in its spelling, at most `MAX_DIMENSIONS`, each
once, on count, sum, avg, min and max meters only; every refusal a 422 naming `dimensions`."""

from __future__ import annotations

from typing import Any

import pytest

from meters.definitions import DIMENSIONED, MAX_DIMENSIONS, MeterCreate, MeterUpdate
from meters.errors import ValidationFailed
from meters.wire import parse_model

BASE: dict[str, Any] = {
    "name": "calls",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "count"},
}
AGGREGATIONS: dict[str, dict[str, Any]] = {
    "count": {"func": "count"},
    "sum": {"func": "sum", "property": "tokens"},
    "avg": {"func": "avg", "property": "tokens"},
    "min": {"func": "min", "property": "tokens"},
    "max": {"func": "max", "property": "tokens"},
    "unique": {"func": "unique", "property": "model"},
    "latest": {"func": "latest", "property": "tokens"},
    "integral": {"func": "integral", "property": "tokens"},
}


def _refused(model: type[MeterCreate | MeterUpdate], body: dict[str, Any]) -> list[Any]:
    with pytest.raises(ValidationFailed) as raised:
        parse_model(model, body)
    return [(e.loc, e.type, e.msg) for e in raised.value.errors]


def test_none_by_default_and_in_polar_spelling() -> None:
    assert parse_model(MeterCreate, BASE).dimensions == []
    # A record of the previous main (and any create without them) carries no key.
    assert "dimensions" not in parse_model(MeterCreate, BASE).model_dump(exclude_unset=True)
    given = ["model", "_llm.model", "metadata.region"]
    assert parse_model(MeterCreate, {**BASE, "dimensions": given}).dimensions == [
        "model",
        "_llm.model",
        "region",  # `metadata.` dropped where it changes nothing, as in a filter
    ]
    kept = ["metadata.name", "metadata.timestamp", "_cost.currency"]
    assert parse_model(MeterCreate, {**BASE, "dimensions": kept}).dimensions == kept


@pytest.mark.parametrize(
    ("dimensions", "loc", "kind"),
    [
        (["a", "b", "c", "d"], ("body", "dimensions"), "too_long"),
        (["a", "metadata.a"], ("body", "dimensions"), "value_error"),
        (["a", "a"], ("body", "dimensions"), "value_error"),
        (["name"], ("body", "dimensions", 0), "value_error"),
        (["a", "timestamp"], ("body", "dimensions", 1), "value_error"),
        (["source"], ("body", "dimensions", 0), "value_error"),
        (["_llm.*"], ("body", "dimensions", 0), "value_error"),
        (["a[0]"], ("body", "dimensions", 0), "value_error"),
        (["a..b"], ("body", "dimensions", 0), "value_error"),
        ([".".join(["k"] * 9)], ("body", "dimensions", 0), "value_error"),
        (["k" * 41], ("body", "dimensions", 0), "value_error"),
        ([""], ("body", "dimensions", 0), "value_error"),
        ([1], ("body", "dimensions", 0), "string_type"),
        ("model", ("body", "dimensions"), "list_type"),
    ],
)
def test_refused_with_a_loc_naming_dimensions(dimensions: Any, loc: Any, kind: str) -> None:
    for model, body in ((MeterCreate, BASE), (MeterUpdate, {})):
        [(found, found_kind, message)] = _refused(model, {**body, "dimensions": dimensions})
        assert (found, found_kind) == (loc, kind), message


def test_messages_say_what_to_do() -> None:
    [(_, _, too_many)] = _refused(MeterCreate, {**BASE, "dimensions": list("abcd")})
    assert too_many == f"A meter has at most {MAX_DIMENSIONS} dimensions"
    [(_, _, column)] = _refused(MeterCreate, {**BASE, "dimensions": ["name"]})
    assert "not a metadata property" in column and "'metadata.name'" in column
    [(_, _, twice)] = _refused(MeterCreate, {**BASE, "dimensions": ["x", "metadata.x"]})
    assert "named once" in twice


@pytest.mark.parametrize("func", sorted(AGGREGATIONS))
def test_only_count_sum_avg_min_and_max_meters_take_them(func: str) -> None:
    aggregation = AGGREGATIONS[func]
    for model, body in ((MeterCreate, BASE), (MeterUpdate, {})):
        given = {**body, "aggregation": aggregation, "dimensions": ["model"]}
        if func in DIMENSIONED:
            assert parse_model(model, given).dimensions == ["model"]
            continue
        [(loc, _, message)] = _refused(model, given)
        assert loc == ("body", "dimensions")
        assert f"count, sum, avg, min and max meters, not to a {func} meter" in message
        # Without dimensions, any aggregation.
        assert parse_model(model, {**given, "dimensions": []}).dimensions == []
    assert {"count", "sum", "avg", "min", "max"} == DIMENSIONED


def test_a_patch_reads_null_as_left_out_and_an_empty_list_as_none() -> None:
    left_out = parse_model(MeterUpdate, {"dimensions": None})
    assert left_out.dimensions is None and "dimensions" not in left_out.model_fields_set
    assert parse_model(MeterUpdate, {"dimensions": []}).model_dump(exclude_unset=True) == {
        "dimensions": []
    }
