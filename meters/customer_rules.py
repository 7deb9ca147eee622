"""Customer input rules (Polar's `CustomerCreate` / `CustomerUpdate`, members aside)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)

from meters.wire import Patch

MetadataKey = Annotated[str, Field(min_length=1, max_length=40)]
MetadataValue = (
    Annotated[str, Field(min_length=1, max_length=500)] | StrictBool | StrictInt | StrictFloat
)
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=50)]
Email = Annotated[str, Field(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
ExternalId = Annotated[str, Field(min_length=1, max_length=512)]


def _empty_is_none(value: Any) -> Any:
    """Polar reads an empty external_id as none (its `EmptyStrToNoneValidator`)."""
    return None if value == "" else value


ShortText = Annotated[str, Field(max_length=256)]


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    line1: ShortText | None = None
    line2: ShortText | None = None
    postal_code: ShortText | None = None
    city: ShortText | None = None
    state: ShortText | None = None
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]


class _CustomerFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    metadata: Metadata | None = None
    name: ShortText | None = None
    billing_address: Address | None = None
    tax_id: ShortText | None = None
    locale: Annotated[str, Field(max_length=35)] | None = None
    email: Email | None = None
    external_id: Annotated[ExternalId | None, BeforeValidator(_empty_is_none)] = None


class CustomerCreate(_CustomerFields):
    type: Literal["individual", "team"] = "individual"
    organization_id: None = Field(
        default=None,
        description="Must be absent: the organization comes from the access token.",
    )
    owner: None = Field(default=None, description="Members are not supported.")

    @model_validator(mode="after")
    def _email_for_individuals(self) -> CustomerCreate:
        if self.type == "individual" and self.email is None:
            raise ValueError("email is required for individual customers")
        return self


class CustomerUpdate(_CustomerFields, Patch):
    """Null empties `name`, `tax_id`, `locale`, `email` (a team's) and an unset `external_id`
    (`store.customer_tables` refuses the rest); `type`, `metadata` and `billing_address` are
    never null (Polar: a 422 for the last two)."""

    NULL_CLEARS = frozenset({"name", "tax_id", "locale", "email", "external_id"})
    type: Literal["individual", "team"] | None = None
