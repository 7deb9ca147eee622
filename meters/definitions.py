"""Meter definitions (Polar's `MeterCreate` / `MeterUpdate`): a filter, an aggregation, labels."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meters.aggregations import Aggregation
from meters.customer_rules import Metadata
from meters.filters import Filter

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
        for _, message in unit_errors(self.unit, self.custom_label, self.custom_multiplier):
            raise ValueError(message)
        return self


class MeterUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    """(field, message) for each of Polar's unit rules a meter breaks: a custom unit needs its
    label, and only a custom unit has a label or a multiplier (Polar checks the label alone)."""
    if unit == "custom":
        if custom_label is None:
            return [("custom_label", "custom_label is required when unit is 'custom'.")]
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
