"""Meter definitions (Polar's `MeterCreate` / `MeterUpdate`): a filter, an aggregation, labels,
and meterline's dimensions.

A meter's `dimensions` (meterline's own; Polar's meter has none) name up to `MAX_DIMENSIONS`
metadata properties whose values split its usage. Each is read as a filter clause's property
is (`meters.filters.parse_path`: `model`, `_llm.model`, `metadata.name`) and kept in its
shortest spelling; `name`, `source` and `timestamp`, the event's own columns, are not metadata
and are refused. Only count, sum, avg, min and max meters take them (`DIMENSIONED`). Their
order is theirs: another order is another definition.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meters.aggregations import Aggregation
from meters.customer_rules import Metadata
from meters.filters import Filter, canonical_property, parse_path
from meters.wire import Patch

Unit = Literal["scalar", "token", "custom"]
Name = Annotated[str, Field(min_length=3, max_length=256)]
Label = Annotated[str, Field(min_length=1, max_length=64)]
Multiplier = Annotated[int, Field(gt=0, le=10**12, strict=True)]
# Each dimension multiplies a meter's rollup rows by its distinct values (issue 64).
MAX_DIMENSIONS = 3
# The aggregations a meter with dimensions may have (v1): their rollups are per-bucket sums,
# counts, lows and highs, kept per dimension value; unique, latest and integral keep sets of
# values or points, not split that way yet.
DIMENSIONED = frozenset({"count", "sum", "avg", "min", "max"})


def _dimension(prop: str) -> str:
    path = parse_path(prop)
    if path.column is not None:
        raise ValueError(
            f"'{prop}' is the event's own {prop}, not a metadata property"
            f" (the metadata key is 'metadata.{prop}')"
        )
    return canonical_property(prop)


def dimensions_error(func: str, dimensions: list[str] | tuple[str, ...]) -> str | None:
    """Why a meter of aggregation `func` cannot have `dimensions`, if it cannot."""
    if not dimensions or func in DIMENSIONED:
        return None
    return f"dimensions apply to count, sum, avg, min and max meters, not to a {func} meter"


def _at_most(value: Any) -> Any:
    # Before the items are read: a long list is refused whole, with the limit named.
    if isinstance(value, list) and len(value) > MAX_DIMENSIONS:
        raise PydanticCustomError(
            "too_long",
            "A meter has at most {limit} dimensions",
            {"limit": MAX_DIMENSIONS},
        )
    return value


def _checked_dimensions(dimensions: list[str], info: ValidationInfo) -> list[str]:
    if len(set(dimensions)) < len(dimensions):
        raise ValueError("each dimension is named once ('metadata.x' and 'x' are the same)")
    # Validated after `aggregation` (declared before): absent there when it was refused.
    aggregation = info.data.get("aggregation")
    if aggregation is not None:
        error = dimensions_error(aggregation.func, dimensions)
        if error is not None:
            raise ValueError(error)
    return dimensions


Dimension = Annotated[str, AfterValidator(_dimension)]
# The list checked whole before its items (`_at_most`) and after them (`_checked_dimensions`),
# on a meter created or patched alike.
Dimensions = Annotated[
    list[Dimension],
    BeforeValidator(_at_most),
    AfterValidator(_checked_dimensions),
    Field(
        max_length=MAX_DIMENSIONS,
        description="meterline's own: metadata properties (as a filter clause names them) whose"
        " values split the meter's usage; count, sum, avg, min and max meters only.",
    ),
]


class MeterCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    filter: Filter
    aggregation: Aggregation
    dimensions: Dimensions = Field(default_factory=list)
    unit: Unit = "scalar"
    custom_label: Label | None = None
    custom_multiplier: Multiplier | None = None
    metadata: Metadata = Field(default_factory=dict)
    organization_id: None = Field(
        default=None, description="Must be absent: the organization comes from the access token."
    )

    @model_validator(mode="after")
    def _custom_unit(self) -> MeterCreate:
        # Polar's MeterCreate requires a custom unit's label; its MeterUpdate has no unit rule,
        # so a PATCH may leave a custom unit without one (Polar then stores it so).
        if self.unit == "custom" and self.custom_label is None:
            raise ValueError("custom_label is required when unit is 'custom'.")
        for _, message in unit_errors(self.unit, self.custom_label, self.custom_multiplier):
            raise ValueError(message)
        return self


class MeterUpdate(Patch):
    """Null empties the custom unit's label and multiplier; Polar reads a null filter,
    aggregation or is_archived as left out, and so are null dimensions, the definition's other
    part (`[]` removes them); any other null is a 422. The dimensions and the aggregation are
    checked together on the meter the patch makes (`meter_tables.update_job`)."""

    model_config = ConfigDict(extra="forbid")
    NULL_CLEARS = frozenset({"custom_label", "custom_multiplier"})
    NULL_IGNORED = frozenset({"filter", "aggregation", "dimensions", "is_archived"})

    name: Name | None = None
    filter: Filter | None = None
    aggregation: Aggregation | None = None
    dimensions: Dimensions | None = None
    unit: Unit | None = None
    custom_label: Label | None = None
    custom_multiplier: Multiplier | None = None
    metadata: Metadata | None = None
    is_archived: bool | None = None


def unit_errors(
    unit: str, custom_label: str | None, custom_multiplier: int | None
) -> list[tuple[str, str]]:
    """(field, message) for each unit rule a meter, created or patched, breaks: only a custom
    unit has a label or a multiplier (Polar checks the label alone, and on creation only)."""
    if unit == "custom":
        return []
    only = "custom_label and custom_multiplier are only allowed when unit is 'custom'."
    return [
        (name, only)
        for name, value in (
            ("custom_label", custom_label),
            ("custom_multiplier", custom_multiplier),
        )
        if value is not None
    ]
