"""Property paths: every path the API accepts compiles to SQL DuckDB evaluates, and JSON path
syntax is refused at the API (a meter can no longer poison ingest)."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.store.metering.meter_sql import Extracted, filter_sql
from meters.aggregations import PropertyAggregation
from meters.filters import (
    MAX_DEPTH,
    MAX_SEGMENT,
    Filter,
    FilterClause,
    canonical_property,
    parse_path,
)

# Letters and digits of any script, and the separators a segment may hold.
SEGMENT_TEXT = st.characters(categories=("L", "Nd")) | st.sampled_from("_-:/@+~% ")
SEGMENTS = st.text(SEGMENT_TEXT, min_size=1, max_size=MAX_SEGMENT).filter(
    lambda s: s == s.strip() and s[0] not in "-:/@+~%"
)


@given(st.lists(SEGMENTS, min_size=1, max_size=MAX_DEPTH))
def test_every_accepted_path_is_evaluated_by_duckdb(keys: list[str]) -> None:
    prop = ".".join(keys)
    try:
        parse_path(prop)
    except ValueError:
        return  # too long as a whole: refused, which is also safe
    meter_filter = Filter.model_validate(
        {"conjunction": "and", "clauses": [{"property": prop, "operator": "eq", "value": 1}]}
    )
    # As ingest reads them: every path extracted at once (where DuckDB refuses wildcards).
    extracted = Extracted()
    where, params = filter_sql(meter_filter, extracted)
    projection, projection_params = extracted.projection()
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE events (name VARCHAR, source VARCHAR, timestamp TIMESTAMPTZ, metadata JSON)"
    )
    con.execute("INSERT INTO events VALUES ('e', 'user', now(), '{\"a\": 1}')")
    con.execute(
        f"WITH r AS (SELECT *, {projection} FROM events),"
        f" f AS (SELECT *, {extracted.facets()} FROM r) SELECT count(*) FROM f WHERE {where}",
        [*projection_params, *params],
    ).fetchall()


@pytest.mark.parametrize(
    "prop", ["*", "_llm.*", "a.*.b", "a[0]", "$", "$.a", "a..b", "a b ", " a", '"a"', "a\\b"]
)
def test_json_path_syntax_is_refused(prop: str) -> None:
    with pytest.raises(ValueError, match="segment"):
        parse_path(prop)


def test_paths_stored_by_earlier_versions_still_load() -> None:
    assert parse_path("*", stored=True).keys == ("*",)


@given(
    prefix=st.sampled_from(["", "metadata.", "metadata.metadata."]),
    keys=st.lists(
        st.sampled_from(["name", "source", "timestamp", "metadata", "tier", "_llm", "x"]),
        min_size=1,
        max_size=3,
    ),
)
def test_a_property_is_kept_in_its_shortest_spelling_of_the_same_path(
    prefix: str, keys: list[str]
) -> None:
    """Polar strips `metadata.`; meterline does too wherever the path stays the same."""
    prop = prefix + ".".join(keys)
    canonical = canonical_property(prop)
    assert parse_path(canonical) == parse_path(prop)
    assert canonical_property(canonical) == canonical
    assert len(canonical) <= len(prop)


def test_metadata_prefixes_are_stripped_as_polar_strips_them_but_not_from_top_level_names() -> None:
    clause = {"operator": "eq", "value": "pro"}
    assert FilterClause.model_validate({"property": "metadata.tier", **clause}).property == "tier"
    assert FilterClause.model_validate({"property": "metadata.name", **clause}).property == (
        "metadata.name"
    )
    summed = PropertyAggregation.model_validate({"func": "sum", "property": "metadata.tokens"})
    assert summed.property == "tokens"
    assert summed.resolved() == parse_path("metadata.tokens")
