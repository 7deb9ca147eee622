"""Query-string and path parsing with 422 errors that name the parameter (`["query", name]`,
`["path", name]`). Ids are read as `meters.wire` spells them, and reach SQL canonical."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from starlette.requests import Request

from meters.errors import FieldError, ValidationFailed
from meters.filters import Filter
from meters.times import datetime_to_us
from meters.wire import ID_MESSAGE, canonical_id, parse_model

MAX_LIMIT = 100
# Offsets stay far inside DuckDB's BIGINT.
MAX_PAGE = 2**31 - 1
# Values of one repeatable parameter (customer_id, meter_id, ...): each widens the query.
MAX_REPEATED = 100
# Timestamps whose periods (up to a year, in any timezone) are dates of years 1..9999.
MIN_TIMESTAMP = datetime(2, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP = datetime(9998, 12, 31, tzinfo=UTC)
# Query booleans as FastAPI (pydantic) reads them, so as Polar does.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _fail(name: str, type_: str, msg: str, value: object) -> ValidationFailed:
    return ValidationFailed([FieldError(type_, ("query", name), msg, value)])


def optional_integer(request: Request, name: str, low: int, high: int | None) -> int | None:
    if request.query_params.get(name) is None:
        return None
    return integer(request, name, low, low, high)


def integer(request: Request, name: str, default: int, low: int | None, high: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _fail(name, "int_parsing", "Input should be a valid integer", raw) from None
    if low is not None and value < low:
        raise _fail(
            name, "greater_than_equal", f"Input should be greater than or equal to {low}", raw
        )
    if high is not None and value > high:
        raise _fail(name, "less_than_equal", f"Input should be less than or equal to {high}", raw)
    return value


def meter_filter(request: Request, name: str) -> Filter | None:
    """A JSON-encoded meter filter, validated as a meter's own (Polar's `events.list(filter=)`)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _fail(name, "json_invalid", "Input should be a JSON-encoded filter", raw) from None
    return parse_model(Filter, decoded, ("query", name))


def page_and_limit(request: Request) -> tuple[int, int]:
    """Polar's paging: both above 0 (`greater_than`), and a larger `limit` read as MAX_LIMIT."""
    page, limit = (integer(request, n, d, None, None) for n, d in (("page", 1), ("limit", 10)))
    for name, value in (("page", page), ("limit", limit)):
        if value < 1:
            raise _fail(name, "greater_than", "Input should be greater than 0", value)
    if page > MAX_PAGE:
        raise _fail(
            "page", "less_than_equal", f"Input should be less than or equal to {MAX_PAGE}", page
        )
    return page, min(limit, MAX_LIMIT)


def timezone(request: Request) -> ZoneInfo:
    """The `timezone` parameter (IANA name, default UTC); Polar's error for an unknown one."""
    name = request.query_params.get("timezone", "UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _fail("timezone", "TimeZoneName", "Invalid timezone name.", name) from None


def boolean(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if raw.lower() not in _TRUE | _FALSE:
        raise _fail(name, "bool_parsing", "Input should be a valid boolean", raw)
    return raw.lower() in _TRUE


def timestamp(request: Request, name: str) -> int | None:
    """An ISO 8601 datetime parameter as UTC microseconds (naive values are read as UTC),
    between MIN_TIMESTAMP and MAX_TIMESTAMP."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace(" ", "+"))
    except ValueError:
        raise _fail(
            name, "datetime_from_date_parsing", "Input should be a valid datetime", raw
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if not MIN_TIMESTAMP <= parsed <= MAX_TIMESTAMP:
        raise _fail(
            name,
            "datetime_range",
            f"Input should be between {MIN_TIMESTAMP.isoformat()} and {MAX_TIMESTAMP.isoformat()}",
            raw,
        )
    return datetime_to_us(parsed)


def strings(request: Request, name: str) -> tuple[str, ...]:
    """Every value of a repeatable parameter: at most MAX_REPEATED (a 422 naming it)."""
    values = tuple(request.query_params.getlist(name))
    if len(values) > MAX_REPEATED:
        raise _fail(
            name, "too_long", f"At most {MAX_REPEATED} values of {name} in one request", len(values)
        )
    return values


def group_by(request: Request) -> tuple[str, ...]:
    """`group_by`'s dimensions (`strings`), each once, in the order first asked."""
    return tuple(dict.fromkeys(strings(request, "group_by")))


def ids(request: Request, name: str) -> tuple[str, ...]:
    """Every value of a repeatable id parameter, canonical; a malformed one is a 422."""
    found = []
    for value in strings(request, name):
        canonical = canonical_id(value)
        if canonical is None:
            raise _fail(name, "uuid_parsing", ID_MESSAGE, value)
        found.append(canonical)
    return tuple(found)


def one_id(request: Request, name: str) -> str | None:
    found = ids(request, name)
    return found[0] if found else None


def path_id(request: Request, name: str = "id") -> str:
    """An id path parameter, canonical; a malformed one is a 422 (Polar's, from FastAPI)."""
    value = request.path_params[name]
    canonical = canonical_id(value)
    if canonical is None:
        raise ValidationFailed([FieldError("uuid_parsing", ("path", name), ID_MESSAGE, value)])
    return canonical


def metadata(request: Request, prefix: str = "metadata") -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`metadata[key]=value` pairs (deepObject style; or of another `prefix`, as a meter's
    `dimension[key]=value`), values of one key OR-ed."""
    found: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith(f"{prefix}[") and name.endswith("]"):
            key = name[len(prefix) + 1 : -1]
            if not 1 <= len(key) <= 40 or "\x00" in key:
                raise _fail(
                    name,
                    f"{prefix}_key",
                    f"{prefix.capitalize()} keys have 1 to 40 characters",
                    key,
                )
            found.setdefault(key, []).append(value)
    return tuple((k, tuple(v)) for k, v in found.items())


def choices(request: Request, name: str, allowed: frozenset[str]) -> tuple[str, ...]:
    """Every value of a repeatable parameter, each one of `allowed` (a 422 otherwise)."""
    values = strings(request, name)
    for value in values:
        if value not in allowed:
            raise _fail(
                name, "enum", "Input should be one of: " + ", ".join(sorted(allowed)), value
            )
    return values


def sorting(request: Request, allowed: frozenset[str], default: str) -> list[str]:
    return list(choices(request, "sorting", allowed)) or [default]
