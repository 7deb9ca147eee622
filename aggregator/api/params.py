"""Query-string parsing with 422 errors that name the parameter (`["query", name]`)."""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request

from aggregator.store.rows import is_uuid as is_uuid
from meters.errors import FieldError, ValidationFailed
from meters.events import EPOCH, datetime_to_us

MAX_LIMIT = 100


def _fail(name: str, type_: str, msg: str, value: object) -> ValidationFailed:
    return ValidationFailed([FieldError(type_, ("query", name), msg, value)])


def integer(request: Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _fail(name, "int_parsing", "Input should be a valid integer", raw) from None
    if value < low:
        raise _fail(
            name, "greater_than_equal", f"Input should be greater than or equal to {low}", raw
        )
    if high is not None and value > high:
        raise _fail(name, "less_than_equal", f"Input should be less than or equal to {high}", raw)
    return value


def page_and_limit(request: Request) -> tuple[int, int]:
    return integer(request, "page", 1, 1, None), integer(request, "limit", 10, 1, MAX_LIMIT)


def timestamp(request: Request, name: str) -> int | None:
    """An ISO 8601 datetime parameter as UTC microseconds (naive values are read as UTC)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace(" ", "+"))
    except ValueError:
        raise _fail(name, "datetime_parsing", "Input should be a valid datetime", raw) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=EPOCH.tzinfo)
    return datetime_to_us(parsed)


def strings(request: Request, name: str) -> tuple[str, ...]:
    return tuple(request.query_params.getlist(name))


def uuids(request: Request, name: str) -> tuple[str, ...]:
    """Every value of a repeatable UUID parameter; a malformed one is a 422."""
    values = strings(request, name)
    for value in values:
        if not is_uuid(value):
            raise _fail(name, "uuid_parsing", "Input should be a valid UUID", value)
    return values


def metadata(request: Request) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`metadata[key]=value` pairs (deepObject style), values of one key OR-ed."""
    found: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata[") : -1]
            if not 1 <= len(key) <= 40 or "\x00" in key:
                raise _fail(name, "metadata_key", "Metadata keys have 1 to 40 characters", key)
            found.setdefault(key, []).append(value)
    return tuple((k, tuple(v)) for k, v in found.items())


def sorting(request: Request, allowed: frozenset[str], default: str) -> list[str]:
    values = request.query_params.getlist("sorting") or [default]
    for value in values:
        if value not in allowed:
            raise _fail(
                "sorting",
                "enum",
                "Input should be one of: " + ", ".join(sorted(allowed)),
                value,
            )
    return values


def pagination(total: int, limit: int) -> dict[str, int]:
    return {"total_count": total, "max_page": -(-total // limit)}
