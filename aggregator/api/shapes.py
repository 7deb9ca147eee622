"""What every resource's shapes use: times as ISO 8601 text and the pagination of lists.

Each resource's shapes (`*_shapes.py`: its responses, and the request models it takes) are
TypedDicts, so that a schema can be generated from them (`pydantic.TypeAdapter(...)
.json_schema()`); each comes with the function that builds it from a service's rows. The key
order of each built dict is the JSON's, which clients depend on. They are `typing_extensions`
TypedDicts: pydantic reads only those on Python < 3.12.
"""

from __future__ import annotations

from typing import Generic, TypeVar, overload

from typing_extensions import TypedDict

from meters.times import us_to_iso

T = TypeVar("T")


class Pagination(TypedDict):
    total_count: int
    max_page: int


class ListResource(TypedDict, Generic[T]):
    """A page of a list (Polar's `ListResource`)."""

    items: list[T]
    pagination: Pagination


@overload
def iso(us: int) -> str: ...
@overload
def iso(us: int | None) -> str | None: ...
def iso(us: int | None) -> str | None:
    if us is None:
        return None
    return us_to_iso(us)


def pagination(total: int, limit: int) -> Pagination:
    return {"total_count": total, "max_page": -(-total // limit)}
