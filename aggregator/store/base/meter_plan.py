"""Many meters evaluated as one: each distinct filter clause and each distinct contribution is
one column of one statement (`meter_sql`, over one parse of each document: `Extracted`); each
distinct filter is combined from its clauses' columns in numpy, level by level; each meter is
then its filter's mask over its contribution, one row of a numpy gather.

Users define meters that share filters (one meter per figure of a model or a route: its events,
tokens, cost and latency), and filters that share clauses (the event's name, a model, a
region): the statement grows with the distinct clauses and contributions, not with the meters,
and nothing is done per meter in Python once the plan is made (`MeterPlan.of`, kept by the
caller per set of meter definitions).

The semantics are `filter_sql`'s, which the property tests hold equal to `Filter.matches`: a
clause is its SQL coalesced to false (a missing property never matches), a group the `and` or
`or` of its clauses and groups, an empty group true.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.arrays import Column, numpy
from aggregator.store.base.meter_sql import SQL, Extracted, clause_sql, contribution_sql
from meters.aggregations import (
    CountAggregation,
    PropertyAggregation,
    UniqueAggregation,
)
from meters.filters import Filter, FilterClause

Definition = tuple[Filter, CountAggregation | PropertyAggregation | UniqueAggregation]
_Key = tuple[Any, ...]
_TRUE: _Key = ("true",)


@dataclass(frozen=True, slots=True)
class _Level:
    """Groups of one conjunction whose children are all computed already: `children` their
    node numbers one group after another, `starts` where each group's begin."""

    conjunction: str
    children: npt.NDArray[np.intp]
    starts: npt.NDArray[np.intp]


@dataclass(frozen=True, slots=True)
class MeterPlan:
    """How a list of meters is evaluated. The statement's columns are `columns`: the clauses
    (booleans, `clauses` of them), then the contributions (`texts[j]`: text, else a number).
    Nodes are numbered: the clauses, then one always true, then the groups, `levels` in order.
    Meter i is node `filters[i]` over contribution `contributions[i]`."""

    extracted: Extracted
    columns: tuple[SQL, ...]
    clauses: int
    texts: tuple[bool, ...]
    levels: tuple[_Level, ...]
    filters: npt.NDArray[np.intp]
    contributions: npt.NDArray[np.intp]

    @classmethod
    def of(cls, meters: Sequence[Definition]) -> MeterPlan:
        return _Compiler().plan(meters)

    def values(self, columns: Sequence[Column]) -> list[pa.Array[Any]]:
        """Each meter's contribution of each row, null where the row is not in the meter
        (its filter, or the aggregation's implicit one), from the statement's `columns`."""
        n = len(columns[0]) if columns else 0
        nodes = np.ones((self.clauses + 1, n), np.bool_)
        for i in range(self.clauses):
            nodes[i] = numpy(columns[i], np.bool_)
        for level in self.levels:
            combine = np.logical_and if level.conjunction == "and" else np.logical_or
            groups = combine.reduceat(nodes[level.children], level.starts, axis=0)
            nodes = np.concatenate([nodes, groups])
        given = [columns[self.clauses + j] for j in range(len(self.texts))]
        present = np.ones((len(given), n), np.bool_)
        for j, column in enumerate(given):
            present[j] = numpy(pc.is_valid(column), np.bool_)
        # Row r of meter i is in the flat arrays at (its contribution) * n + r.
        inside = nodes[self.filters] & present[self.contributions]
        at = self.contributions[:, None] * n + np.arange(n)
        numbers = np.zeros((len(given), n), np.float64)
        for j, column in enumerate(given):
            if not self.texts[j]:
                numbers[j] = numpy(column, np.float64)
        texts = pa.concat_arrays(
            [_chunk(c) if self.texts[j] else pa.nulls(n, pa.string()) for j, c in enumerate(given)]
            or [pa.array([], pa.string())]
        )
        is_text = np.array(self.texts, np.bool_)[self.contributions]
        out: list[pa.Array[Any] | None] = [None] * len(self.filters)
        for wanted, make in ((~is_text, _numbers), (is_text, _texts)):
            meters = np.flatnonzero(wanted)
            if not len(meters):
                continue
            flat = make(numbers, texts, at[meters].ravel(), ~inside[meters].ravel())
            for k, meter in enumerate(meters.tolist()):
                out[meter] = flat.slice(k * n, n)
        return [a for a in out if a is not None]


def _numbers(
    numbers: npt.NDArray[np.float64],
    texts: pa.Array[Any],
    at: npt.NDArray[np.intp],
    absent: npt.NDArray[np.bool_],
) -> pa.Array[Any]:
    return pa.array(numbers.ravel()[at], pa.float64(), mask=absent)


def _texts(
    numbers: npt.NDArray[np.float64],
    texts: pa.Array[Any],
    at: npt.NDArray[np.intp],
    absent: npt.NDArray[np.bool_],
) -> pa.Array[Any]:
    return texts.take(pa.array(at, pa.int64(), mask=absent))


def _chunk(column: Column) -> pa.Array[Any]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.cast(pa.string())


class _Compiler:
    """Numbers each distinct clause, contribution and group once, in the order met."""

    def __init__(self) -> None:
        self.extracted = Extracted()
        self.clauses: dict[_Key, int] = {}
        self.clause_sql: list[SQL] = []
        self.contributions: dict[_Key, int] = {}
        self.contribution_sql: list[SQL] = []
        self.texts: list[bool] = []
        # A group's key: its conjunction and its children's keys; its depth in the tree.
        self.groups: dict[_Key, int] = {}

    def plan(self, meters: Sequence[Definition]) -> MeterPlan:
        filter_keys = [self._filter(f) for f, _ in meters]
        contributions = [self._contribution(a) for _, a in meters]
        # Groups numbered after the clauses and the node always true, a level per depth and
        # conjunction, so that a level reads only nodes already computed.
        order = sorted(self.groups, key=lambda key: (self.groups[key], key[0]))
        number: dict[_Key, int] = {("clause", i): i for i in range(len(self.clause_sql))}
        number[_TRUE] = len(self.clause_sql)
        levels: list[_Level] = []
        for key in order:
            number[key] = len(number)
        for depth, conjunction in dict.fromkeys((self.groups[k], k[0]) for k in order):
            keys = [k for k in order if (self.groups[k], k[0]) == (depth, conjunction)]
            children = [[number[c] for c in k[1]] for k in keys]
            starts = np.cumsum([0, *(len(c) for c in children[:-1])])
            levels.append(
                _Level(
                    conjunction,
                    np.array([c for cs in children for c in cs], np.intp),
                    starts.astype(np.intp),
                )
            )
        return MeterPlan(
            self.extracted,
            (*self.clause_sql, *self.contribution_sql),
            len(self.clause_sql),
            tuple(self.texts),
            tuple(levels),
            np.array([number[k] for k in filter_keys], np.intp),
            np.array(contributions, np.intp),
        )

    def _filter(self, meter_filter: Filter) -> _Key:
        if not meter_filter.clauses:
            return _TRUE
        children: list[_Key] = []
        for clause in meter_filter.clauses:
            if isinstance(clause, FilterClause):
                children.append(self._clause(clause))
            else:
                children.append(self._filter(clause))
        key = (meter_filter.conjunction, tuple(children))
        if key not in self.groups:
            self.groups[key] = 1 + max(
                (self.groups.get(c, 0) for c in children if c[0] in ("and", "or")), default=0
            )
        return key

    def _clause(self, clause: FilterClause) -> _Key:
        text, params = clause_sql(clause, self.extracted)
        key = (text, *_typed(params))
        if key not in self.clauses:
            self.clauses[key] = len(self.clause_sql)
            self.clause_sql.append((f"coalesce({text}, FALSE)", params))
        return ("clause", self.clauses[key])

    def _contribution(
        self, aggregation: CountAggregation | PropertyAggregation | UniqueAggregation
    ) -> int:
        text, params = contribution_sql(aggregation, self.extracted)
        key = (text, *_typed(params))
        if key not in self.contributions:
            self.contributions[key] = len(self.contribution_sql)
            self.contribution_sql.append((text, params))
            self.texts.append(isinstance(aggregation, UniqueAggregation))
        return self.contributions[key]


def _typed(params: list[Any]) -> tuple[tuple[str, Any], ...]:
    """Bound values with their types: `1`, `1.0` and `True` are equal in Python, not in SQL."""
    return tuple((type(p).__name__, p) for p in params)
