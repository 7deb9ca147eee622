"""Polar's ingest body as the project's contract reference records it (docs/internals/decisions.md,
§1.2–1.4: the field types and constraints of Polar's `EventsIngest`, its metadata value union,
and its refusal of NUL characters in any string), declared here with pydantic so that a test can
ask what Polar answers for a body. FastAPI validates the decoded JSON body in Python (lax)
mode, so `errors` does the same and returns pydantic's errors with FastAPI's `body` prefix.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, NotRequired

from pydantic import (
    UUID4,
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from typing_extensions import TypedDict

MetadataValue = Annotated[str, StringConstraints(min_length=1, max_length=500)] | int | float | bool


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(map(_has_nul, value))
    return False


class Schema(BaseModel):
    """Polar's models refuse a NUL character in any string of any field, nested ones included,
    with a `value_error` at the field. (`from_attributes`: a body that is no object is then a
    `model_attributes_type` error.)"""

    model_config = ConfigDict(from_attributes=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if _has_nul(value):
            raise ValueError("This value contains invalid characters")
        return value


def is_past_timestamp(timestamp: datetime) -> datetime:
    timestamp = timestamp.astimezone(UTC)
    if timestamp > datetime.now(UTC):
        raise ValueError("Timestamp must be in the past.")
    return timestamp


class CostMetadata(TypedDict):
    amount: Annotated[Decimal, Field(max_digits=17, decimal_places=12)]
    currency: Annotated[str, Field(pattern="usd")]


class LLMMetadata(TypedDict):
    vendor: str
    model: str
    prompt: Annotated[str | None, Field(default=None)]
    response: Annotated[str | None, Field(default=None)]
    input_tokens: int
    cached_input_tokens: NotRequired[int]
    output_tokens: int
    total_tokens: int


class EventMetadataInput(TypedDict, total=False, extra_items=MetadataValue):  # type: ignore[call-arg]
    _cost: CostMetadata
    _llm: LLMMetadata


class EventCreateBase(Schema):
    timestamp: Annotated[AwareDatetime, AfterValidator(is_past_timestamp)] = Field(
        default_factory=lambda: datetime.now(UTC)
    )
    name: str = Field(..., max_length=128)
    organization_id: UUID4 | None = None
    external_id: str | None = None
    parent_id: str | None = None
    metadata: EventMetadataInput = Field(default_factory=lambda: EventMetadataInput())


class EventCreateCustomer(EventCreateBase):
    customer_id: UUID4
    member_id: UUID4 | None = None


class EventCreateExternalCustomer(EventCreateBase):
    external_customer_id: str
    external_member_id: str | None = None


class EventsIngest(Schema):
    events: list[EventCreateCustomer | EventCreateExternalCustomer]


# The parts of a pydantic `loc` that name a union member, not a field.
UNION_TAGS = frozenset(
    {"EventCreateCustomer", "EventCreateExternalCustomer", "constrained-str", "str", "int"}
    | {"float", "bool", "function-after[is_past_timestamp(), datetime]"}
)


def errors(body: Any) -> list[tuple[str, tuple[str | int, ...]]] | None:
    """Polar's (type, loc) for a decoded body, union member names left out; None: accepted."""
    try:
        EventsIngest.model_validate(body)
    except ValidationError as exc:
        return [
            (e["type"], ("body", *(p for p in e["loc"] if p not in UNION_TAGS)))
            for e in exc.errors()
        ]
    return None
