"""One semantics, two engines: `Filter.matches` / `fold` and the compiled DuckDB SQL agree."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from aggregator.store.metering.meter_sql import (
    Extracted,
    aggregate_sql,
    contribution_sql,
    filter_sql,
    member_pointer,
)
from meters.aggregations import Aggregation, fold
from meters.filters import EventView, Filter
from tests.strategies import examples

# Few names and values, so that clauses often hit, and every type meets every other.
KEYS = ["a", "b", "n"]
TEXTS = st.sampled_from(["", "5", "a", "ab", "b%", "true", "x_y", "Ä"])
SCALARS = st.one_of(
    TEXTS,
    st.integers(-3, 6),
    st.sampled_from([2**31 - 1, -(2**31), 2**53 + 1, 2**64 - 1, -(2**63)]),
    st.sampled_from([0.0, -0.0, 0.5, 5.0, 2.5, -1.25, 1e20, 1e-7]),
    st.booleans(),
)
PROPERTIES = [
    "a",
    "b",
    "n.x",
    "metadata.a",
    "metadata.name",
    "name",
    "source",
    "timestamp",
    "_cost.amount",
    "_llm.total_tokens",
    "_llm.model",
    "_llm",
    "missing",
]


@st.composite
def events(draw: st.DrawFn) -> EventView:
    metadata: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from([*KEYS, "name"]), unique=True)):
        if key == "n" and draw(st.booleans()):
            metadata[key] = {"x": draw(SCALARS)}
        else:
            metadata[key] = draw(SCALARS)
    if draw(st.booleans()):
        amount = draw(st.sampled_from(["0", "5", "0.0371", "-2.5", "99999.999999999999", "12"]))
        metadata["_cost"] = {"amount": amount, "currency": "usd"}
    if draw(st.booleans()):
        metadata["_llm"] = {
            "vendor": "openai",
            "model": draw(st.sampled_from(["gpt-4o", "5", "a"])),
            "prompt": None,
            "response": None,
            "input_tokens": 1,
            "output_tokens": 2,
            "total_tokens": draw(st.integers(0, 6)),
        }
    return EventView(
        name=draw(st.sampled_from(["a", "5", "llm.completion", "ab"])),
        source=draw(st.sampled_from(["user", "system"])),
        timestamp_us=draw(st.integers(-(10**12), 10**16) | st.sampled_from([0, -1, 4_999_999])),
        metadata=metadata,
    )


clause_values = st.one_of(TEXTS, st.integers(-3, 6), st.booleans(), st.sampled_from([2**31 - 1]))
clauses = st.fixed_dictionaries(
    {
        "property": st.sampled_from(PROPERTIES),
        "operator": st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "like", "not_like"]),
        "value": clause_values,
    }
)
filters = st.recursive(
    st.fixed_dictionaries(
        {"conjunction": st.sampled_from(["and", "or"]), "clauses": st.lists(clauses, max_size=3)}
    ),
    lambda inner: st.fixed_dictionaries(
        {
            "conjunction": st.sampled_from(["and", "or"]),
            "clauses": st.lists(st.one_of(clauses, inner), max_size=3),
        }
    ),
    max_leaves=6,
)
aggregations = st.one_of(
    st.just({"func": "count"}),
    st.fixed_dictionaries(
        {
            "func": st.sampled_from(["sum", "max", "min", "avg", "unique", "latest"]),
            "property": st.sampled_from([p for p in PROPERTIES if p not in ("name", "source")]),
        }
    ),
    st.fixed_dictionaries({"func": st.just("unique"), "property": st.sampled_from(["name"])}),
)
AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    with duckdb.connect() as connection:
        connection.execute("SET TimeZone = 'UTC'")
        yield connection


def _load(con: duckdb.DuckDBPyConnection, batch: list[EventView]) -> None:
    table = pa.table(
        {
            "idx": pa.array(range(len(batch)), pa.int64()),
            "name": [e.name for e in batch],
            "source": [e.source for e in batch],
            "timestamp": pa.array([e.timestamp_us for e in batch], pa.timestamp("us", tz="UTC")),
            "metadata": [orjson.dumps(e.metadata).decode() for e in batch],
        }
    )
    con.register("_loaded", table)
    con.execute(
        "CREATE OR REPLACE TABLE events AS SELECT idx, name, source, timestamp,"
        " metadata::JSON AS metadata FROM _loaded"
    )
    con.unregister("_loaded")


@pytest.mark.slow
@settings(max_examples=examples(150))
@given(batch=st.lists(events(), max_size=12), raw=filters)
def test_filter_matches_equals_compiled_sql(
    con: duckdb.DuckDBPyConnection, batch: list[EventView], raw: dict[str, Any]
) -> None:
    meter_filter = Filter.model_validate(raw)
    _load(con, batch)
    where, params = filter_sql(meter_filter)
    in_sql = {r[0] for r in con.execute(f"SELECT idx FROM events WHERE {where}", params).fetchall()}
    in_python = {i for i, e in enumerate(batch) if meter_filter.matches(e)}
    assert in_sql == in_python


def sql_aggregate(con: duckdb.DuckDBPyConnection, meter_filter: Filter, aggregation: Any) -> float:
    where, where_params = filter_sql(meter_filter)
    value, value_params = contribution_sql(aggregation)
    rows = con.execute(
        f"SELECT {aggregate_sql(aggregation)} FROM (SELECT {value} AS contribution,"
        f" epoch_us(timestamp) AS at_us FROM events WHERE {where}) WHERE contribution IS NOT NULL",
        [*value_params, *where_params],
    ).fetchall()
    return float(rows[0][0])


@pytest.mark.slow
@settings(max_examples=examples(150))
@given(batch=st.lists(events(), max_size=12), raw=filters, raw_aggregation=aggregations)
def test_aggregation_fold_equals_compiled_sql(
    con: duckdb.DuckDBPyConnection,
    batch: list[EventView],
    raw: dict[str, Any],
    raw_aggregation: dict[str, Any],
) -> None:
    meter_filter = Filter.model_validate(raw)
    aggregation = AGGREGATION.validate_python(raw_aggregation)
    _load(con, batch)
    expected = fold(aggregation, [e for e in batch if meter_filter.matches(e)])
    actual = sql_aggregate(con, meter_filter, aggregation)
    assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9), (actual, expected)


@settings(max_examples=examples(100))
@given(
    batch=st.lists(events(), max_size=12),
    meters=st.lists(st.tuples(filters, aggregations), min_size=1, max_size=5),
)
@pytest.mark.slow
def test_meters_sharing_extracted_paths_equal_the_fold(
    con: duckdb.DuckDBPyConnection,
    batch: list[EventView],
    meters: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    """Rollups evaluate many meters over one parse per document (`Extracted`): each metadata
    path and facet computed once, shared by every meter reading it. Each meter's value must
    still be the fold of its events."""
    _load(con, batch)
    extracted = Extracted()
    columns: list[str] = []
    params: list[Any] = []
    parsed = []
    for raw_filter, raw_aggregation in meters:
        meter_filter = Filter.model_validate(raw_filter)
        aggregation = AGGREGATION.validate_python(raw_aggregation)
        parsed.append((meter_filter, aggregation))
        where, where_params = filter_sql(meter_filter, extracted)
        value, value_params = contribution_sql(aggregation, extracted)
        columns.append(f"CASE WHEN {where} THEN {value} END AS v{len(columns)}")
        params += [*where_params, *value_params]
    projection, projection_params = extracted.projection()
    values = (
        f"WITH r AS MATERIALIZED (SELECT name, source, timestamp, {projection} FROM events),"
        f" f AS MATERIALIZED (SELECT *, {extracted.facets()} FROM r)"
        f" SELECT epoch_us(timestamp) AS at_us, {', '.join(columns)} FROM f"
    )
    for i, (meter_filter, aggregation) in enumerate(parsed):
        rows = con.execute(
            f"SELECT {aggregate_sql(aggregation)} FROM (SELECT v{i} AS contribution, at_us"
            f" FROM ({values})) WHERE contribution IS NOT NULL",
            [*projection_params, *params],
        ).fetchall()
        expected = fold(aggregation, [e for e in batch if meter_filter.matches(e)])
        assert math.isclose(float(rows[0][0]), expected, rel_tol=1e-9, abs_tol=1e-9), i


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        *[("count", 4), ("sum", 90), ("avg", 22.5), ("min", 10), ("max", 30), ("unique", 3)],
        ("latest", 30),  # all at one instant: the greatest
    ],
)
def test_polar_docs_example(con: duckdb.DuckDBPyConnection, func: str, expected: float) -> None:
    """Polar's meters docs: values 10, 20, 30, 30."""
    batch = [EventView("api", "user", 0, {"v": v}) for v in (10, 20, 30, 30)]
    raw = {"func": "count"} if func == "count" else {"func": func, "property": "v"}
    aggregation = AGGREGATION.validate_python(raw)
    everything = Filter(conjunction="and", clauses=[])
    assert fold(aggregation, batch) == expected
    _load(con, batch)
    assert sql_aggregate(con, everything, aggregation) == expected


@given(
    key=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40),
    other=st.sampled_from(["a", "*", "~", "/", "a/b", "~1", '"', "$"]),
)
def test_a_member_pointer_names_exactly_its_key(
    con: duckdb.DuckDBPyConnection, key: str, other: str
) -> None:
    """Query filters on metadata take any key literally: `*`, `~`, `/`, quotes and `$` too."""
    document = orjson.dumps({key: "hit", other: "miss"} if key != other else {key: "hit"})
    found = con.execute(
        "SELECT json_extract_string(?::JSON, ?)", [document.decode(), member_pointer(key)]
    ).fetchall()
    assert found == [("hit",)]
