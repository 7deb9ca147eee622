"""Meter definitions (Polar's `MeterCreate` / `MeterUpdate`): a filter, an aggregation, labels."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meters.aggregations import Aggregation
from meters.customer_rules import Metadata
from meters.filters import Filter
from meters.wire import Patch

Unit = Literal["scalar", "token", "custom"]
Name = Annotated[str, Field(min_length=3, max_length=256)]
Label = Annotated[str, Field(min_length=1, max_length=64)]
Multiplier = Annotated[int, Field(gt=0, le=10**12, strict=True)]


class MeterCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    filter: Filter
    aggregation: Aggregation
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
    aggregation or is_archived as left out; any other null is a 422."""

    model_config = ConfigDict(extra="forbid")
    NULL_CLEARS = frozenset({"custom_label", "custom_multiplier"})
    NULL_IGNORED = frozenset({"filter", "aggregation", "is_archived"})

    name: Name | None = None
    filter: Filter | None = None
    aggregation: Aggregation | None = None
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
