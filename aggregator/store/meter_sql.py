"""Meter filters and aggregations compiled to DuckDB SQL over the `events` columns.

The SQL twin of `meters.filters` / `meters.aggregations`, which define the semantics; a property
test holds the two to the same answer on every event. Values and JSON paths are always bound
parameters; property names were validated by `meters.filters.parse_path`, and none of their
text reaches the SQL string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meters.aggregations import CountAggregation, PropertyAggregation, UniqueAggregation
from meters.filters import COST_AMOUNT, Filter, FilterClause, Path, clause_text

_SQL_OPS = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_NUMBER_TYPES = "('BIGINT', 'UBIGINT', 'DOUBLE')"
# Casts are TRY_CASTs: DuckDB may evaluate them on rows the kind check rules out.
# Epoch seconds floored, in integer arithmetic (DuckDB's // truncates toward zero).
_EPOCH_SECONDS = (
    "((epoch_us(timestamp) - (((epoch_us(timestamp) % 1000000) + 1000000) % 1000000)) // 1000000)"
)

SQL = tuple[str, list[Any]]


def json_path(keys: tuple[str, ...]) -> str:
    """A JSON path of quoted member names (bound as a parameter, never spliced into SQL)."""
    quoted = (key.replace("\\", "\\\\").replace('"', '\\"') for key in keys)
    return "$." + ".".join(f'"{key}"' for key in quoted)


@dataclass(frozen=True, slots=True)
class _Typed:
    """SQL for one metadata path: its comparison kind ('str' | 'num' | 'bool' | NULL), its text
    and its number, each with the bound parameters it needs."""

    kind: SQL
    text: SQL
    number: SQL


def _typed(path: Path) -> _Typed:
    p = json_path(path.keys)
    if path.keys == COST_AMOUNT:
        return _Typed(
            ("CASE WHEN json_type(metadata, ?) = 'VARCHAR' THEN 'num' END", [p]),
            ("NULL", []),
            ("TRY_CAST(json_extract_string(metadata, ?) AS DOUBLE)", [p]),
        )
    return _Typed(
        (
            "CASE json_type(metadata, ?) WHEN 'VARCHAR' THEN 'str' WHEN 'BOOLEAN' THEN 'bool'"
            " WHEN 'BIGINT' THEN 'num' WHEN 'UBIGINT' THEN 'num' WHEN 'DOUBLE' THEN 'num' END",
            [p],
        ),
        ("json_extract_string(metadata, ?)", [p]),
        ("TRY_CAST(json_extract(metadata, ?) AS DOUBLE)", [p]),
    )


def _when(typed: _Typed, kind: str, expr: SQL, *tail: Any) -> SQL:
    """`(<kind of path> = kind AND <expr>)` with the parameters in placeholder order."""
    return f"({typed.kind[0]} = '{kind}' AND {expr[0]})", [*typed.kind[1], *expr[1], *tail]


def clause_sql(clause: FilterClause) -> SQL:
    path = clause.resolved()
    value = clause.value
    value_kind = "bool" if type(value) is bool else "num" if type(value) is int else "str"
    if clause.operator in ("like", "not_like"):
        negate = "NOT " if clause.operator == "not_like" else ""
        if path.column in ("name", "source"):
            return f"({negate}contains({path.column}, ?))", [clause_text(value)]
        if path.column == "timestamp":
            return "FALSE", []
        typed = _typed(path)
        text_sql, text_params = typed.text
        return _when(
            typed, "str", (f"{negate}contains({text_sql}, ?)", text_params), clause_text(value)
        )
    op = _SQL_OPS[clause.operator]
    if path.column in ("name", "source"):
        return (f"({path.column} {op} ?)", [value]) if value_kind == "str" else ("FALSE", [])
    if path.column == "timestamp":
        return (f"({_EPOCH_SECONDS} {op} ?)", [value]) if value_kind == "num" else ("FALSE", [])
    typed = _typed(path)
    if value_kind == "str":
        return _when(typed, "str", (f"{typed.text[0]} {op} ?", typed.text[1]), value)
    if value_kind == "num":
        return _when(typed, "num", (f"{typed.number[0]} {op} ?", typed.number[1]), value)
    boolean = f"TRY_CAST(json_extract(metadata, ?) AS BOOLEAN) {op} ?"
    return _when(typed, "bool", (boolean, [json_path(path.keys)]), value)


def filter_sql(meter_filter: Filter) -> SQL:
    """A boolean expression true exactly for the events `meter_filter.matches`."""
    if not meter_filter.clauses:
        return "TRUE", []
    parts: list[str] = []
    params: list[Any] = []
    for clause in meter_filter.clauses:
        sql, clause_params = (
            filter_sql(clause) if isinstance(clause, Filter) else clause_sql(clause)
        )
        # NULL (a missing property) must act as false inside any and/or nesting.
        parts.append(f"coalesce({sql}, FALSE)")
        params.extend(clause_params)
    joiner = " AND " if meter_filter.conjunction == "and" else " OR "
    return "(" + joiner.join(parts) + ")", params


def contribution_sql(
    aggregation: CountAggregation | PropertyAggregation | UniqueAggregation,
) -> SQL:
    """Per event: 1.0 for count; the number for sum/avg/min/max (NULL: not in the meter); the
    distinct-value key for unique (NULL: no value)."""
    if isinstance(aggregation, CountAggregation):
        return "CAST(1 AS DOUBLE)", []
    path = aggregation.resolved()
    if path.column == "timestamp":
        seconds = "(epoch_us(timestamp) / 1000000)"
        if isinstance(aggregation, UniqueAggregation):
            return f"('n:' || CAST({seconds} + 0.0 AS VARCHAR))", []
        return seconds, []
    if path.column is not None:  # name / source: only unique accepts them
        return f"('s:' || {path.column})", []
    typed = _typed(path)
    number_sql, number_params = typed.number
    if isinstance(aggregation, PropertyAggregation):
        return (
            f"(CASE WHEN {typed.kind[0]} = 'num' THEN {number_sql} END)",
            [*typed.kind[1], *number_params],
        )
    text_sql, text_params = typed.text
    return (
        f"(CASE {typed.kind[0]} WHEN 'str' THEN 's:' || {text_sql}"
        f" WHEN 'num' THEN 'n:' || CAST({number_sql} + 0.0 AS VARCHAR)"
        f" WHEN 'bool' THEN 'b:' || {text_sql} END)",
        [*typed.kind[1], *text_params, *number_params, *text_params],
    )


def aggregate_sql(aggregation: CountAggregation | PropertyAggregation | UniqueAggregation) -> str:
    """The aggregate over a `contribution` column, coalesced to 0 like Polar's quantities."""
    if isinstance(aggregation, CountAggregation):
        return "coalesce(count(*), 0)"
    if isinstance(aggregation, UniqueAggregation):
        return "count(DISTINCT contribution)"
    return f"coalesce({aggregation.func}(contribution), 0)"


def meter_events_sql(
    meter_filter: Filter, aggregation: CountAggregation | PropertyAggregation | UniqueAggregation
) -> SQL:
    """Events that are in the meter: its filter matches, and for sum/avg/min/max the property
    is a number (the aggregation's implicit filter)."""
    where, params = filter_sql(meter_filter)
    if not isinstance(aggregation, PropertyAggregation):
        return where, params
    value, value_params = contribution_sql(aggregation)
    return f"({where} AND {value} IS NOT NULL)", [*params, *value_params]
