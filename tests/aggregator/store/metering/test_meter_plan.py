"""Meters evaluated as one (`MeterPlan`): each distinct clause, group and contribution once,
shared by every meter that has it. Each meter's value must still be the fold of its events."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.base.rows import registered
from aggregator.store.metering.meter_plan import MeterPlan
from aggregator.store.metering.meter_sql import aggregate_sql
from meters.aggregations import fold
from meters.filters import EventView, Filter
from tests.aggregator.store.metering.test_meter_sql import (
    AGGREGATION,
    _load,
    aggregations,
    clauses,
    events,
    filters,
)
from tests.strategies import examples


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    with duckdb.connect() as connection:
        connection.execute("SET TimeZone = 'UTC'")
        yield connection


@st.composite
def shared(draw: st.DrawFn) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Meters as users make them: drawn from a few filters and aggregations, so that filters,
    their clauses and their groups repeat (the same group nested in several filters too)."""
    groups = draw(st.lists(filters, min_size=1, max_size=3))
    pool = draw(
        st.lists(
            st.one_of(
                st.sampled_from(groups),
                st.fixed_dictionaries(
                    {
                        "conjunction": st.sampled_from(["and", "or"]),
                        "clauses": st.lists(
                            st.one_of(clauses, st.sampled_from(groups)), max_size=3
                        ),
                    }
                ),
            ),
            min_size=1,
            max_size=4,
        )
    )
    measures = draw(st.lists(aggregations, min_size=1, max_size=3))
    return draw(
        st.lists(
            st.tuples(st.sampled_from(pool), st.sampled_from(measures)), min_size=1, max_size=8
        )
    )


def _evaluated(
    con: duckdb.DuckDBPyConnection, plan: MeterPlan
) -> tuple[list[pa.Array[Any]], pa.ChunkedArray[Any]]:
    projection, projection_params = plan.extracted.projection()
    listed = ", ".join(f"{text} AS _c{i}" for i, (text, _) in enumerate(plan.columns))
    table = con.sql(
        f"WITH r AS MATERIALIZED (SELECT idx, name, source, timestamp, {projection} FROM events),"
        f" f AS MATERIALIZED (SELECT *, {plan.extracted.facets()} FROM r)"
        f" SELECT epoch_us(timestamp) AS at_us, {listed} FROM f ORDER BY idx",
        params=[*projection_params, *(p for _, ps in plan.columns for p in ps)],
    ).to_arrow_table()
    found = plan.evaluated(table.columns[1:])
    return [found.column(i) for i in range(len(found.filters))], table.column("at_us")


@pytest.mark.slow
@settings(max_examples=examples(150), deadline=None)
@given(batch=st.lists(events(), min_size=1, max_size=12), meters=shared())
def test_meters_sharing_filters_equal_the_fold(
    con: duckdb.DuckDBPyConnection,
    batch: list[EventView],
    meters: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    _load(con, batch)
    parsed = [(Filter.model_validate(f), AGGREGATION.validate_python(a)) for f, a in meters]
    values, at_us = _evaluated(con, MeterPlan.of(parsed))
    assert len(values) == len(parsed)
    for i, (meter_filter, aggregation) in enumerate(parsed):
        # Which events are in the meter: its filter, and the aggregation's implicit one.
        expected = fold(aggregation, [e for e in batch if meter_filter.matches(e)])
        meter = pa.table({"contribution": values[i], "at_us": at_us.combine_chunks()})
        with registered(con, "_meter", meter):
            rows = con.execute(
                f"SELECT {aggregate_sql(aggregation)} FROM _meter WHERE contribution IS NOT NULL"
            ).fetchall()
        actual = float(rows[0][0])
        assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9), (i, meters[i])


def test_shared_parts_are_compiled_once() -> None:
    """Five meters of two filters sharing a clause: two groups, three clauses, two
    contributions; the statement grows with those, not with the meters."""
    llm = {"property": "name", "operator": "eq", "value": "llm"}
    one = Filter.model_validate(
        {"conjunction": "and", "clauses": [llm, {"property": "m", "operator": "eq", "value": 1}]}
    )
    two = Filter.model_validate(
        {"conjunction": "and", "clauses": [llm, {"property": "m", "operator": "eq", "value": 2}]}
    )
    count = AGGREGATION.validate_python({"func": "count"})
    tokens = AGGREGATION.validate_python({"func": "sum", "property": "tokens"})
    plan = MeterPlan.of([(one, count), (one, tokens), (two, count), (two, tokens), (one, count)])
    assert plan.clauses == 3
    assert len(plan.columns) == 3 + 2
    assert [len(level.starts) for level in plan.levels] == [2]
    assert plan.filters.tolist() == [4, 4, 5, 5, 4]
