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
        check_unit(self.unit, self.custom_label)
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


def check_unit(unit: str, custom_label: str | None) -> None:
    """A custom unit needs its label (Polar's rule)."""
    if unit == "custom" and not custom_label:
        raise ValueError("custom_label is required when unit is 'custom'")
