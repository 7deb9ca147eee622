"""What every resource's shapes use: times as ISO 8601 text and the pagination of lists."""

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
