"""Meter filters (Polar's shape) and their reference evaluation, `Filter.matches`.

One semantics, type-strict (docs/internals/decisions.md, decision 5), so that this evaluator and the
SQL compiled from the same filter agree on every event:

- A string compares only with a string, a number (integer or float, never a boolean) only with a
  number, a boolean only with a boolean; any other pairing does not match.
- A missing property, JSON null, an object or a list never matches, whatever the operator
  (`ne` and `not_like` included).
- `like` / `not_like` are case-sensitive substring tests on string properties; the clause value
  is used as text (`5` looks for "5", `true` for "true").
- Properties: `name`, `source` (strings), `timestamp` (integer epoch seconds, floored), or a
  metadata path. `_cost.amount` is a number (stored as an exact decimal string). A
  `metadata.` prefix is optional and always means metadata (`metadata.name` is the metadata
  key "name"); dotted paths reach into `_cost` and `_llm` (`_llm.total_tokens`). A property
  is kept in its shortest spelling (`canonical_property`): `metadata.x` is stored and returned
  as `x`, as Polar does, unless the prefix is what makes it metadata (`metadata.name`).
- An empty `clauses` list matches every event.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

RESERVED = frozenset({"name", "source", "timestamp"})
# Stored as a canonical decimal string (exact cents), compared and aggregated as a number.
COST_AMOUNT = ("_cost", "amount")
MAX_SEGMENT = 40
MAX_DEPTH = 8
MAX_PATH = 200
# Clause groups nested in a filter, the filter itself counting as one (Polar sets no limit; a
# stored definition is JSON, and deep ones could not be read back).
MAX_NESTING = 10
# A segment is a plain key: Unicode letters and digits, `_`, and a few separators that mean
# nothing to JSON paths. Wildcards (`*`), brackets, `$`, quotes and the like are refused: the
# path is compiled to a DuckDB JSON path, where they would change its meaning or fail to bind.
_SEGMENT = re.compile(r"[^\W][\w\-:/@+~% ]*", re.UNICODE)
INT32 = (-(2**31), 2**31 - 1)

Operator = Literal["eq", "ne", "gt", "gte", "lt", "lte", "like", "not_like"]
Value = Annotated[str, Field(max_length=1000)] | StrictBool | StrictInt


@dataclass(frozen=True, slots=True)
class EventView:
    """What a filter can see of an event."""

    name: str
    source: str
    timestamp_us: int
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Path:
    """A validated property: a reserved column, or a path of metadata keys."""

    column: str | None
    keys: tuple[str, ...]

    def value(self, event: EventView) -> Any:
        """The property's value, or None when it is missing."""
        if self.column == "name":
            return event.name
        if self.column == "source":
            return event.source
        if self.column == "timestamp":
            return event.timestamp_us // 1_000_000
        current: Any = event.metadata
        for key in self.keys:
            if type(current) is not dict:
                return None
            current = current.get(key)
        if self.keys == COST_AMOUNT and type(current) is str:
            return float(current)
        return current


def parse_path(prop: str, *, stored: bool = False) -> Path:
    """Resolve a property name; ValueError when it is not a safe path. `stored` accepts what
    earlier versions accepted (a definition already stored must still load, and is then marked
    failed if it cannot be evaluated)."""
    if prop in RESERVED:
        return Path(prop, ())
    if len(prop) > MAX_PATH and not stored:
        raise ValueError(f"a property path has at most {MAX_PATH} characters")
    rest = prop.removeprefix("metadata.") if prop.startswith("metadata.") else prop
    keys = tuple(rest.split("."))
    if len(keys) > MAX_DEPTH:
        raise ValueError(f"a property path has at most {MAX_DEPTH} segments")
    for key in keys:
        if not 1 <= len(key) <= MAX_SEGMENT:
            raise ValueError(f"each path segment has 1 to {MAX_SEGMENT} characters")
        if any(ord(c) < 32 or c in '"\\' for c in key):
            raise ValueError("path segments cannot contain control characters, quotes or '\\'")
        if stored:
            continue
        if _SEGMENT.fullmatch(key) is None or key != key.strip():
            raise ValueError(
                f"path segment {key!r} may hold only letters, digits, '_' and '-:/@+~% '"
                " (no wildcards or JSON path syntax), starting with a letter, digit or '_'"
            )
    return Path(None, keys)


def canonical_property(prop: str) -> str:
    """`prop` without a `metadata.` prefix it does not need: the same path (`parse_path`) in
    Polar's spelling. Kept where it matters: before a top-level name (`metadata.name` is the
    metadata key, `name` the event's name) or another `metadata.` (the key "metadata")."""
    rest = prop.removeprefix("metadata.")
    if rest == prop or rest in RESERVED or rest.startswith("metadata."):
        return prop
    return rest


def nesting(data: Any) -> int:
    """How many levels of clause groups (objects with `clauses`) a raw filter has, counted
    level by level up to one past MAX_NESTING."""
    level, depth = [data], 0
    while level and depth <= MAX_NESTING:
        depth += 1
        level = [
            clause
            for group in level
            if isinstance(group, dict) and isinstance(group.get("clauses"), list)
            for clause in group["clauses"]
            if isinstance(clause, dict) and "clauses" in clause
        ]
    return depth


# Validation context of definitions read back from the store (`parse_path(stored=True)`).
STORED = {"stored": True}


def is_stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("stored"))


def _kind(value: Any) -> str | None:
    """The comparison type of a value: "str", "num", "bool", or None (never matches)."""
    kind = type(value)
    if kind is str:
        return "str"
    if kind is bool:
        return "bool"
    if kind is int or (kind is float and math.isfinite(value)):
        return "num"
    return None


def clause_text(value: str | int | bool) -> str:
    """A clause value as text, for like / not_like."""
    if type(value) is bool:
        return "true" if value else "false"
    return str(value)


class FilterClause(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    property: str
    operator: Operator
    value: Value

    @field_validator("property")
    @classmethod
    def _safe_property(cls, prop: str, info: ValidationInfo) -> str:
        parse_path(prop, stored=is_stored(info))
        return canonical_property(prop)

    @field_validator("value")
    @classmethod
    def _int32(cls, value: str | int | bool) -> str | int | bool:
        if type(value) is int and not INT32[0] <= value <= INT32[1]:
            raise ValueError("integer values are 32-bit (-2147483648..2147483647)")
        return value

    _path: Path = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._path = parse_path(self.property, stored=True)  # checked by its validator

    def resolved(self) -> Path:
        return self._path

    def matches(self, event: EventView) -> bool:
        actual = self._path.value(event)
        kind = _kind(actual)
        if kind is None:
            return False
        if self.operator in ("like", "not_like"):
            if kind != "str":
                return False
            found = clause_text(self.value) in actual
            return found if self.operator == "like" else not found
        if kind != _kind(self.value):
            return False
        expected = self.value
        op = self.operator
        if op == "eq":
            return bool(actual == expected)
        if op == "ne":
            return bool(actual != expected)
        if op == "gt":
            return bool(actual > expected)
        if op == "gte":
            return bool(actual >= expected)
        if op == "lt":
            return bool(actual < expected)
        return bool(actual <= expected)


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    conjunction: Literal["and", "or"]
    clauses: list[FilterClause | Filter] = Field(max_length=100)

    @model_validator(mode="before")
    @classmethod
    def _shallow(cls, data: Any, info: ValidationInfo) -> Any:
        # Checked on the raw input, before the groups are validated one level at a time.
        if not is_stored(info) and nesting(data) > MAX_NESTING:
            raise ValueError(f"a filter nests at most {MAX_NESTING} levels of clause groups")
        return data

    def matches(self, event: EventView) -> bool:
        if not self.clauses:
            return True
        results = (clause.matches(event) for clause in self.clauses)
        return all(results) if self.conjunction == "and" else any(results)
