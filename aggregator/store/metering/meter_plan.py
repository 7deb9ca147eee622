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
from aggregator.store.metering.meter_sql import (
    SQL,
    Extracted,
    clause_sql,
    contribution_sql,
    dimension_sql,
)
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
    Meter i is node `filters[i]` over contribution `contributions[i]`. `dimensions`: each
    dimension's value as text (`dimension_sql`, over the same parse), of the dimensions asked."""

    extracted: Extracted
    columns: tuple[SQL, ...]
    clauses: int
    texts: tuple[bool, ...]
    levels: tuple[_Level, ...]
    filters: npt.NDArray[np.intp]
    contributions: npt.NDArray[np.intp]
    dimensions: tuple[SQL, ...] = ()

    @classmethod
    def of(cls, meters: Sequence[Definition], dimensions: Sequence[str] = ()) -> MeterPlan:
        return _Compiler().plan(meters, dimensions)

    def evaluated(self, columns: Sequence[Column]) -> Contributions:
        """Every meter's contributions of the rows of the statement's `columns`."""
        n = len(columns[0]) if columns else 0
        nodes = np.ones((self.clauses + 1, n), np.bool_)
        for i in range(self.clauses):
            nodes[i] = numpy(columns[i], np.bool_)
        for level in self.levels:
            combine = np.logical_and if level.conjunction == "and" else np.logical_or
            groups = combine.reduceat(nodes[level.children], level.starts, axis=0)
            nodes = np.concatenate([nodes, groups])
        given = [columns[self.clauses + j] for j in range(len(self.texts))]
        valid = np.ones((len(given), n), np.bool_)
        numbers = np.zeros((len(given), n), np.float64)
        texts = []
        for j, column in enumerate(given):
            valid[j] = numpy(pc.is_valid(column), np.bool_)
            if self.texts[j]:
                texts.append(_chunk(column).cast(pa.string()))
            else:
                numbers[j] = numpy(column, np.float64)
                texts.append(pa.nulls(n, pa.string()))
        return Contributions(
            nodes, valid, numbers, tuple(texts), self.filters, self.contributions, self.texts
        )


@dataclass(frozen=True, slots=True)
class Contributions:
    """Meters' contributions of some rows, kept per distinct filter and contribution: row r is
    in meter i when `nodes[filters[i], r]` (its filter) and `valid[contributions[i], r]` (the
    aggregation's implicit filter); its contribution is then `numbers[contributions[i], r]`,
    or `texts[contributions[i]][r]` where `text[contributions[i]]` (a unique meter). What is
    done per meter is a row of a numpy gather, whatever the number of meters."""

    nodes: npt.NDArray[np.bool_]
    valid: npt.NDArray[np.bool_]
    numbers: npt.NDArray[np.float64]
    texts: tuple[pa.Array[Any], ...]
    filters: npt.NDArray[np.intp]
    contributions: npt.NDArray[np.intp]
    text: tuple[bool, ...]

    @property
    def rows(self) -> int:
        return int(self.nodes.shape[1])

    def inside(self, meters: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Per meter of `meters` (positions) and row: whether the row is in the meter."""
        return self.nodes[self.filters[meters]] & self.valid[self.contributions[meters]]

    def column(self, meter: int) -> pa.Array[Any]:
        """Meter `meter`'s contribution of each row, null where the row is not in it."""
        j = int(self.contributions[meter])
        absent = ~(self.nodes[self.filters[meter]] & self.valid[j])
        if self.text[j]:
            texts: pa.Array[Any] = pc.if_else(
                pa.array(~absent), self.texts[j], pa.scalar(None, pa.string())
            )
            return texts
        return pa.array(self.numbers[j], pa.float64(), mask=absent)

    def long(
        self, meters: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], pa.Array[Any]]:
        """The contributions to `meters` (positions, all numbers or all texts) as rows: (the
        meter's place in `meters`, the row, the contribution), meter by meter, then by row."""
        which, rows = np.nonzero(self.inside(meters))
        at = self.contributions[meters][which]
        if not len(meters) or not self.text[int(self.contributions[meters[0]])]:
            return which, rows, pa.array(self.numbers[at, rows], pa.float64())
        flat = pa.concat_arrays(list(self.texts))
        return which, rows, flat.take(pa.array(at * self.rows + rows, pa.int64()))

    def taken(self, rows: npt.NDArray[np.intp]) -> Contributions:
        """The contributions of `rows` (positions), in their order."""
        index = pa.array(rows, pa.int64())
        return Contributions(
            self.nodes[:, rows],
            self.valid[:, rows],
            self.numbers[:, rows],
            tuple(t.take(index) for t in self.texts),
            self.filters,
            self.contributions,
            self.text,
        )

    def reordered(self, meters: npt.NDArray[np.intp]) -> Contributions:
        """The same rows' contributions to the meters at `meters` (positions), in that order."""
        return Contributions(
            self.nodes,
            self.valid,
            self.numbers,
            self.texts,
            self.filters[meters],
            self.contributions[meters],
            self.text,
        )

    @staticmethod
    def joined(parts: Sequence[Contributions]) -> Contributions:
        """Parts of one plan's contributions (their rows one after another) as one."""
        first = parts[0]
        return Contributions(
            np.concatenate([p.nodes for p in parts], axis=1),
            np.concatenate([p.valid for p in parts], axis=1),
            np.concatenate([p.numbers for p in parts], axis=1),
            tuple(pa.concat_arrays([p.texts[j] for p in parts]) for j in range(len(first.texts))),
            first.filters,
            first.contributions,
            first.text,
        )


def _chunk(column: Column) -> pa.Array[Any]:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


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

    def plan(self, meters: Sequence[Definition], dimensions: Sequence[str]) -> MeterPlan:
        filter_keys = [self._filter(f) for f, _ in meters]
        contributions = [self._contribution(a) for _, a in meters]
        dimension_columns = tuple(dimension_sql(name, self.extracted) for name in dimensions)
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
            dimension_columns,
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
