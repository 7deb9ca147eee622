"""Values that requests carry as text, one definition for bodies, paths and query strings: ids
and timestamps. Everything else in a JSON body is JSON's own type, strictly (`parse_model`).

An id is a UUID spelled as Polar's API accepts it (pydantic's UUID type, which FastAPI applies
to paths, queries and bodies alike), hex digits in either case:

    6f1c2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b          hyphenated
    6f1c2a3b4c5d4e6f8a9b0c1d2e3f4a5b              32 hex digits
    {6f1c2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b}        braced
    urn:uuid:6f1c2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b URN

and is read as its canonical spelling (lowercase, hyphenated), the only one that reaches SQL.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from meters.errors import FieldError, ValidationFailed

M = TypeVar("M", bound=BaseModel)
_HYPHENATED = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ID = re.compile(rf"{_HYPHENATED}|\{{{_HYPHENATED}\}}|urn:uuid:{_HYPHENATED}|[0-9a-fA-F]{{32}}")
ID_MESSAGE = "Input should be a valid UUID (hyphenated, braced, urn:uuid: or 32 hex digits)"


def canonical_id(text: str) -> str | None:
    """`text` as a canonical id, or None when it is not a spelling of one."""
    if _ID.fullmatch(text) is None:
        return None
    return str(uuid.UUID(text))


def is_canonical_id(text: str) -> bool:
    return canonical_id(text) == text


def _id(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return value
    if type(value) is not str:
        raise PydanticCustomError("uuid_type", "Input should be a UUID string")
    canonical = canonical_id(value)
    if canonical is None:
        raise PydanticCustomError("uuid_parsing", ID_MESSAGE)
    return uuid.UUID(canonical)


def _timestamp(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if type(value) is not str:
        raise PydanticCustomError("datetime_type", "Input should be an ISO 8601 datetime string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "datetime_parsing", "Input should be a valid ISO 8601 datetime"
        ) from None


# A UUID field of a request body: only a string with one of the spellings above.
Id = Annotated[uuid.UUID, BeforeValidator(_id)]
# A datetime field of a request body: only an ISO 8601 string with a UTC offset.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp)]


def parse_model(model: type[M], body: Any, loc: tuple[str, ...] = ("body",)) -> M:
    """Validate a decoded JSON `body` against `model`, strictly: a string is never a number or
    a boolean, a number never a string (Polar coerces them). Ids and timestamps are strings,
    read by `meters.wire`. Errors become ValidationFailed with locs under `loc`."""
    try:
        return model.model_validate(body, strict=True)
    except PydanticValidationError as exc:
        raise ValidationFailed(
            [
                FieldError(e["type"], (*loc, *e["loc"]), e["msg"], e.get("input"))
                for e in exc.errors(include_url=False)
            ]
        ) from None


def _null_where_allowed(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """A `Patch`'s JSON Schema: null only for the fields that take it."""
    takes_null = model.nullable() if issubclass(model, Patch) else frozenset()
    for name, field in schema.get("properties", {}).items():
        options = field.get("anyOf")
        if name in takes_null or not options or {"type": "null"} not in options:
            continue
        rest = [o for o in options if o != {"type": "null"}]
        del field["anyOf"]
        field.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        if "default" in field and field["default"] is None:
            del field["default"]  # left out, it keeps its value


class Patch(BaseModel):
    """A PATCH body: a field left out keeps its value. Null is refused (422 naming the field)
    unless the model lists the field in `NULL_CLEARS` (null empties it) or `NULL_IGNORED`
    (null reads as the field left out, as Polar reads it there). Every PATCH route's body is
    one (tests/aggregator/api/test_patch_bodies.py sends null for every field)."""

    model_config = ConfigDict(json_schema_extra=_null_where_allowed)
    NULL_CLEARS: ClassVar[frozenset[str]] = frozenset()
    NULL_IGNORED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def nullable(cls) -> frozenset[str]:
        return cls.NULL_CLEARS | cls.NULL_IGNORED

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name not in cls.nullable():
            raise PydanticCustomError(
                "null_not_allowed", "Input should not be null (leave the field out to keep it)"
            )
        return value

    @model_validator(mode="after")
    def _null_as_left_out(self) -> Self:
        for name in self.NULL_IGNORED:
            if getattr(self, name) is None:
                self.model_fields_set.discard(name)
        return self
