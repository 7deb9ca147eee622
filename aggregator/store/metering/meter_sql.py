"""Meter filters and aggregations compiled to DuckDB SQL over the `events` columns.

The SQL twin of `meters.filters` / `meters.aggregations`, which define the semantics; a property
test holds the two to the same answer on every event. Values and JSON paths are always bound
parameters; property names were validated by `meters.filters.parse_path`, and none of their
text reaches the SQL string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meters.aggregations import (
    CountAggregation,
    IntegralAggregation,
    PropertyAggregation,
    UniqueAggregation,
)
from meters.filters import COST_AMOUNT, Filter, FilterClause, Path, clause_text, parse_path

_SQL_OPS = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
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


def member_pointer(key: str) -> str:
    """A JSON pointer (RFC 6901) to the member `key` of a document, whatever the key's text: a
    pointer has no wildcards, where a JSON path reads `$."*"` as one even quoted. For query
    filters on metadata keys, which need not be valid property names."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


class Inline:
    """Each metadata path read where it is used: `json_extract(metadata, path)`."""

    def value(self, path: Path) -> SQL:
        return "json_extract(metadata, ?)", [json_path(path.keys)]

    def facet(self, sql: SQL) -> SQL:
        return sql


class Extracted:
    """The metadata paths and per-path facets (kind, text, number, ...) a set of meters reads,
    each computed once per row however many meters use it.

    The statement projects `projection()` (the JSON values of all paths from one parse of the
    document, column `_j`), then `facets()` over it, each in a materialized step below the
    expressions built with this source.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._facets: list[str] = []

    def value(self, path: Path) -> SQL:
        p = json_path(path.keys)
        if p not in self.paths:
            self.paths.append(p)
        return f"_j[{self.paths.index(p) + 1}]", []

    def facet(self, sql: SQL) -> SQL:
        text, params = sql
        assert not params, "facets read `_j` only"
        if text not in self._facets:
            self._facets.append(text)
        return f"_f{self._facets.index(text)}", []

    def projection(self) -> SQL:
        if not self.paths:
            return "NULL AS _j", []
        return "json_extract(metadata, ?::VARCHAR[]) AS _j", [self.paths]

    def facets(self) -> str:
        return ", ".join(f"{text} AS _f{i}" for i, text in enumerate(self._facets)) or "NULL AS _f"


Source = Inline | Extracted
INLINE = Inline()


@dataclass(frozen=True, slots=True)
class _Typed:
    """SQL for one metadata path: its comparison kind ('str' | 'num' | 'bool' | NULL), its text,
    its number and its boolean, each with the bound parameters it needs."""

    kind: SQL
    text: SQL
    number: SQL
    boolean: SQL


def _typed(path: Path, source: Source) -> _Typed:
    value, params = source.value(path)
    if path.keys == COST_AMOUNT:
        return _Typed(
            source.facet((f"CASE WHEN json_type({value}) = 'VARCHAR' THEN 'num' END", params)),
            ("NULL", []),
            source.facet((f"TRY_CAST(json_extract_string({value}, '$') AS DOUBLE)", params)),
            ("NULL", []),
        )
    kind = (
        f"CASE json_type({value}) WHEN 'VARCHAR' THEN 'str' WHEN 'BOOLEAN' THEN 'bool'"
        " WHEN 'BIGINT' THEN 'num' WHEN 'UBIGINT' THEN 'num' WHEN 'DOUBLE' THEN 'num' END"
    )
    return _Typed(
        source.facet((kind, params)),
        source.facet((f"json_extract_string({value}, '$')", params)),
        source.facet((f"TRY_CAST({value} AS DOUBLE)", params)),
        source.facet((f"TRY_CAST({value} AS BOOLEAN)", params)),
    )


def _when(typed: _Typed, kind: str, expr: SQL, *tail: Any) -> SQL:
    """`(<kind of path> = kind AND <expr>)` with the parameters in placeholder order."""
    return f"({typed.kind[0]} = '{kind}' AND {expr[0]})", [*typed.kind[1], *expr[1], *tail]


def clause_sql(clause: FilterClause, source: Source = INLINE) -> SQL:
    path = clause.resolved()
    value = clause.value
    value_kind = "bool" if type(value) is bool else "num" if type(value) is int else "str"
    if clause.operator in ("like", "not_like"):
        negate = "NOT " if clause.operator == "not_like" else ""
        if path.column in ("name", "source"):
            return f"({negate}contains({path.column}, ?))", [clause_text(value)]
        if path.column == "timestamp":
            return "FALSE", []
        typed = _typed(path, source)
        text_sql, text_params = typed.text
        return _when(
            typed, "str", (f"{negate}contains({text_sql}, ?)", text_params), clause_text(value)
        )
    op = _SQL_OPS[clause.operator]
    if path.column in ("name", "source"):
        return (f"({path.column} {op} ?)", [value]) if value_kind == "str" else ("FALSE", [])
    if path.column == "timestamp":
        return (f"({_EPOCH_SECONDS} {op} ?)", [value]) if value_kind == "num" else ("FALSE", [])
    typed = _typed(path, source)
    if value_kind == "str":
        return _when(typed, "str", (f"{typed.text[0]} {op} ?", typed.text[1]), value)
    if value_kind == "num":
        return _when(typed, "num", (f"{typed.number[0]} {op} ?", typed.number[1]), value)
    return _when(typed, "bool", (f"{typed.boolean[0]} {op} ?", typed.boolean[1]), value)


def dimension_sql(name: str, source: Source = INLINE) -> SQL:
    """An event's value of the dimension `name` (a property path, read as a filter reads it:
    `_llm.model` is a path), as text; null where it has none (decision 19)."""
    value, params = source.value(parse_path(name, stored=True))
    return source.facet((f"json_extract_string({value}, '$')", params))


def filter_sql(meter_filter: Filter, source: Source = INLINE) -> SQL:
    """A boolean expression true exactly for the events `meter_filter.matches`."""
    if not meter_filter.clauses:
        return "TRUE", []
    parts: list[str] = []
    params: list[Any] = []
    for clause in meter_filter.clauses:
        sql, clause_params = (
            filter_sql(clause, source) if isinstance(clause, Filter) else clause_sql(clause, source)
        )
        # NULL (a missing property) must act as false inside any and/or nesting.
        parts.append(f"coalesce({sql}, FALSE)")
        params.extend(clause_params)
    joiner = " AND " if meter_filter.conjunction == "and" else " OR "
    return "(" + joiner.join(parts) + ")", params


def contribution_sql(
    aggregation: CountAggregation | PropertyAggregation | UniqueAggregation, source: Source = INLINE
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
    typed = _typed(path, source)
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
    """The aggregate over a `contribution` column (and, for latest, the event's `at_us`),
    coalesced to 0 like Polar's quantities. An integral is no aggregate of its period's events
    alone (`quantities.integral_sql`)."""
    if isinstance(aggregation, CountAggregation):
        return "coalesce(count(*), 0)"
    if isinstance(aggregation, UniqueAggregation):
        return "count(DISTINCT contribution)"
    if isinstance(aggregation, IntegralAggregation):
        raise ValueError("an integral depends on the events before its period")
    if aggregation.func == "latest":
        return "coalesce(max({'at_us': at_us, 'value': contribution}).value, 0)"
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
