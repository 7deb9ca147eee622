"""The error `type` of every query-parameter rule of Polar's list and quantity routes against
Polar's, through HTTP. Polar's type is pydantic's for the parameter as Polar declares it
(`kit/pagination.py`, `event/endpoints.py`, `meter/endpoints.py`: validated from the query
string, as FastAPI does) or the one Polar's code writes (named in the row)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import pytest
from pydantic import AwareDatetime, Field, TypeAdapter, ValidationError

from tests.processes import Server


class TimeInterval(StrEnum):  # polar: kit/time_queries.py
    year = "year"
    month = "month"
    week = "week"
    day = "day"
    hour = "hour"


class EventSource(StrEnum):  # polar: models/event.py
    system = "system"
    user = "user"


def _pydantic(annotation: Any, value: str) -> str:
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        return str(exc.errors()[0]["type"])
    raise AssertionError(f"Polar's declaration accepts {value!r}")


POSITIVE = Annotated[int, Field(gt=0)]  # page, limit
DEPTH = Annotated[int, Field(ge=0, le=5)]
QUANTITIES = "{meter}/quantities"
WINDOW = {
    "start_timestamp": "2026-01-01T00:00:00Z",
    "end_timestamp": "2026-01-02T00:00:00Z",
    "interval": "day",
}
# (route, parameters, the parameter the error names, Polar's type)
ROWS: list[tuple[str, dict[str, str], str, str]] = [
    ("/v1/events/", {"page": "0"}, "page", _pydantic(POSITIVE, "0")),
    ("/v1/events/", {"limit": "0"}, "limit", _pydantic(POSITIVE, "0")),
    ("/v1/events/", {"page": "x"}, "page", _pydantic(int, "x")),
    ("/v1/events/", {"depth": "6"}, "depth", _pydantic(DEPTH, "6")),
    ("/v1/events/", {"depth": "-1"}, "depth", _pydantic(DEPTH, "-1")),
    ("/v1/events/", {"sorting": "name"}, "sorting", "enum"),  # kit/sorting.py
    ("/v1/events/", {"query": "ab"}, "query", "query"),  # event/endpoints.py
    ("/v1/events/", {"source": "robot"}, "source", _pydantic(EventSource, "robot")),
    ("/v1/events/", {"customer_id": "x"}, "customer_id", _pydantic(uuid.UUID, "x")),
    (
        "/v1/events/",
        {"start_timestamp": "yesterday"},
        "start_timestamp",
        _pydantic(AwareDatetime, "yesterday"),
    ),
    ("/v1/events/names", {"sorting": "label"}, "sorting", "enum"),
    ("/v1/event-types/", {"root_events": "maybe"}, "root_events", _pydantic(bool, "maybe")),
    ("/v1/customers/", {"limit": "-1"}, "limit", _pydantic(POSITIVE, "-1")),
    ("/v1/meters/", {"page": "0"}, "page", _pydantic(POSITIVE, "0")),
    (QUANTITIES, {**WINDOW, "interval": "minute"}, "interval", _pydantic(TimeInterval, "minute")),
    (QUANTITIES, {**WINDOW, "timezone": "Mars/Olympus"}, "timezone", "TimeZoneName"),
    (
        QUANTITIES,
        {k: v for k, v in WINDOW.items() if k != "start_timestamp"},
        "start_timestamp",
        "missing",
    ),
    # meter/endpoints.py: "The interval is too small for the given date range."
    (
        QUANTITIES,
        {**WINDOW, "start_timestamp": "2016-01-01T00:00:00Z", "interval": "hour"},
        "interval",
        "value_error",
    ),
]


@pytest.fixture(scope="module")
def meter(server: Server) -> str:
    with server.client() as client:
        created = client.post(
            "/v1/meters/",
            json={
                "name": f"types-{uuid.uuid4().hex}",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": "count"},
            },
        )
        assert created.status_code == 201, created.text
        return f"/v1/meters/{created.json()['id']}"


@pytest.mark.parametrize(("route", "query", "name", "polars"), ROWS)
def test_a_query_parameter_rule_answers_polars_type(
    server: Server, meter: str, route: str, query: dict[str, str], name: str, polars: str
) -> None:
    with server.client() as client:
        response = client.get(route.format(meter=meter), params=query)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert (error["type"], error["loc"][-1]) == (polars, name)


def test_polars_types_are_not_guessed() -> None:
    """The pydantic types the table takes from Polar's declarations are those names."""
    assert _pydantic(POSITIVE, "0") == "greater_than"
    assert _pydantic(AwareDatetime, "yesterday") == "datetime_from_date_parsing"
    assert isinstance(TypeAdapter(AwareDatetime).validate_python("2026-01-01T00:00:00Z"), datetime)
