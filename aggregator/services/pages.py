"""A page of a list and the count of everything the list's filters match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    total: int


def offset(page: int, limit: int) -> int:
    """Rows before `page` (counted from 1) of `limit` rows each."""
    return (page - 1) * limit
