"""Meter aggregations (Polar's shape): what each event contributes, and the reference fold.

- `count` counts the matching events.
- `sum`, `avg`, `min`, `max` take the property's numeric value; an event whose property is not a
  number (a boolean is not a number) is not in the meter at all (Polar's implicit filter).
- `unique` counts distinct values of the property: strings, numbers (1 and 1.0 are the same
  number) and booleans are distinct from each other; events whose property is missing or not
  a scalar are in the meter but contribute no value.
- `timestamp` as an aggregation property is the event time in epoch seconds (float).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from meters.filters import EventView, Path, canonical_property, is_stored, parse_path

UniqueKey = tuple[str, str | float | bool]
# Aggregations whose results over periods add up to the result over their union: only these
# can be pre-summed per period and forwarded as such (rollup mode), counted upstream by `sum`.
ADDITIVE = frozenset({"count", "sum"})


def _checked(prop: str, info: ValidationInfo, *, numeric: bool) -> str:
    path = parse_path(prop, stored=is_stored(info))
    if numeric and path.column in ("name", "source"):
        raise ValueError(f"'{prop}' is not numeric; sum, avg, min and max need a number")
    return canonical_property(prop)


class CountAggregation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    func: Literal["count"]

    def contribution(self, event: EventView) -> float | None:
        return 1.0


class PropertyAggregation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    func: Literal["sum", "max", "min", "avg"]
    property: str

    @field_validator("property")
    @classmethod
    def _numeric_property(cls, prop: str, info: ValidationInfo) -> str:
        return _checked(prop, info, numeric=True)

    _path: Path = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._path = parse_path(self.property, stored=True)  # checked by its validator

    def resolved(self) -> Path:
        return self._path

    def contribution(self, event: EventView) -> float | None:
        """The event's number, or None: then the event is not in the meter."""
        return number(self._path, event)


class UniqueAggregation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    func: Literal["unique"]
    property: str

    @field_validator("property")
    @classmethod
    def _safe_property(cls, prop: str, info: ValidationInfo) -> str:
        return _checked(prop, info, numeric=False)

    _path: Path = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._path = parse_path(self.property, stored=True)  # checked by its validator

    def resolved(self) -> Path:
        return self._path

    def contribution(self, event: EventView) -> UniqueKey | None:
        """The event's distinct-value key, or None when it has no scalar value."""
        return unique_key(self._path, event)


Aggregation = Annotated[
    CountAggregation | PropertyAggregation | UniqueAggregation, Field(discriminator="func")
]


def number(path: Path, event: EventView) -> float | None:
    if path.column == "timestamp":
        return event.timestamp_us / 1_000_000
    value = path.value(event)
    kind = type(value)
    if kind is int or kind is float:
        result = float(value)
        return result if math.isfinite(result) else None
    return None


def unique_key(path: Path, event: EventView) -> UniqueKey | None:
    if path.column == "timestamp":
        return ("n", event.timestamp_us / 1_000_000)
    value = path.value(event)
    kind = type(value)
    if kind is str:
        return ("s", value)
    if kind is bool:
        return ("b", value)
    if kind is int or kind is float:
        result = float(value)
        return ("n", result + 0.0) if math.isfinite(result) else None  # -0.0 is 0.0
    return None


def fold(
    aggregation: CountAggregation | PropertyAggregation | UniqueAggregation,
    events: Iterable[EventView],
) -> float:
    """The reference result over the events (already filtered by the meter's filter).

    An empty meter gives 0 (Polar's quantities coalesce to 0).
    """
    if isinstance(aggregation, CountAggregation):
        return float(sum(1 for _ in events))
    if isinstance(aggregation, UniqueAggregation):
        keys: set[Any] = {aggregation.contribution(e) for e in events}
        keys.discard(None)
        return float(len(keys))
    values = [v for v in (aggregation.contribution(e) for e in events) if v is not None]
    if not values:
        return 0.0
    if aggregation.func == "sum":
        return math.fsum(values)
    if aggregation.func == "avg":
        return math.fsum(values) / len(values)
    return max(values) if aggregation.func == "max" else min(values)


@dataclass(slots=True)
class Partial:
    """A mergeable partial aggregate of a meter over some events: enough for every aggregation
    (merging partials of disjoint events gives the partial of their union)."""

    events: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    values: set[Hashable] = field(default_factory=set)  # unique meters' distinct values

    def add(self, events: int, total: float, low: float, high: float) -> None:
        self.events += events
        self.total += total
        self.low = min(self.low, low)
        self.high = max(self.high, high)

    def add_event(self, contribution: float | UniqueKey | None) -> None:
        """One event in the meter, with its `contribution()`."""
        if isinstance(contribution, tuple):
            self.events += 1
            self.values.add(contribution)
        elif contribution is None:
            self.events += 1
        else:
            self.add(1, contribution, contribution, contribution)

    def merge(self, other: Partial) -> None:
        self.add(other.events, other.total, other.low, other.high)
        self.values |= other.values

    def result(self, func: str) -> float:
        """The aggregation's result (0 for an empty meter, like Polar's quantities)."""
        if func == "count":
            return float(self.events)
        if func == "unique":
            return float(len(self.values))
        if self.events == 0:
            return 0.0
        return {
            "sum": self.total,
            "avg": self.total / self.events,
            "min": self.low,
            "max": self.high,
        }[func]
