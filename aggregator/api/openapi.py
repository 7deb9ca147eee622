"""How a route declares itself for the OpenAPI document: an `ApiRoute` is a Starlette route
with its `Operation` (summary, query parameters, the request body's model, the response shape
per status: the same TypedDicts and pydantic models the route builds and parses).
`openapi_document` turns an app's declared routes into the document.

A route that is not API is a plain `Route(..., include_in_schema=False)`; any other route
without a declaration is missing from the document, which tests/aggregator/api/test_openapi.py
catches. Query parameters are declared with the helpers below, one per reader in `params`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from starlette.routing import Route

from aggregator.api.params import MAX_LIMIT, MAX_PAGE

# A TypedDict or pydantic model (or a generic alias of one), as the route builds or parses it.
Shape = Any
Schema = dict[str, Any]
# Which bearer token the route takes ("metrics": `--metrics-token`, when the server has one).
Security = Literal["organization", "customer", "metrics", "none"]

ID: Schema = {"type": "string", "format": "uuid"}
STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
DATETIME: Schema = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601; without an offset, UTC",
}
# What the writes keyed by `external_id` (credits, resets, plans, holds, alerts) answer.
IDEMPOTENT = (
    "The `external_id` is the idempotency key: the same request sent again gets the first"
    " answer (200), a different one a 409."
)
_PATH_SEGMENT = re.compile(r"\{(\w+)(?::\w+)?\}")
# Path parameters by name: every route spells each one the same way (see `params.path_id`).
PATH_PARAMS: dict[str, Schema] = {
    "id": ID,
    "external_id": {"type": "string", "description": "the customer's external id"},
    "seq": {"type": "integer", "description": "a quarantined event's sequence number"},
}


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter."""

    name: str
    schema: Schema
    description: str = ""
    required: bool = False
    # `name[key]=value` pairs (`metadata`), OpenAPI's deepObject style.
    deep_object: bool = False

    def spec(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.name, "in": "query", "schema": self.schema}
        if self.description:
            found["description"] = self.description
        if self.required:
            found["required"] = True
        if self.deep_object:
            found |= {"style": "deepObject", "explode": True}
        return found


@dataclass(frozen=True, slots=True)
class Text:
    """A response body that is not JSON (CSV, Prometheus text, an event stream)."""

    media_type: str


@dataclass(frozen=True, slots=True)
class Operation:
    """What a route takes and answers. `responses` maps each success status to its body's
    shape (None: no body); `errors` lists the error statuses beyond those `openapi_document`
    adds from the rest (401 with a token, 422 with inputs, 404 with a path parameter, …)."""

    summary: str
    tag: str
    responses: Mapping[int, Shape | Text | None]
    query: tuple[Param, ...] = ()
    body: Shape | None = None
    errors: tuple[int, ...] = ()
    security: Security = "organization"
    description: str = ""

    def by_external_id(self) -> Operation:
        """The same operation on a customer named by its external id."""
        return replace(self, summary=f"{self.summary} by external id")


class ApiRoute(Route):
    """A route of one method, declared for the OpenAPI document."""

    def __init__(
        self,
        path: str,
        endpoint: Callable[..., Any],
        method: str,
        operation: Operation,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(path, endpoint, methods=[method], name=name)
        self.method = method
        self.operation = operation

    def path_params(self) -> list[str]:
        return _PATH_SEGMENT.findall(self.path)

    def openapi_path(self) -> str:
        """The path without Starlette's converters (`{external_id:path}` → `{external_id}`)."""
        return _PATH_SEGMENT.sub(r"{\1}", self.path)


def declared(route: Route, operation: Operation) -> ApiRoute:
    """`route` (of one method, made elsewhere: the edge's) with its declaration."""
    (method,) = set(route.methods or ()) - {"HEAD"}
    return ApiRoute(route.path, route.endpoint, method, operation, name=route.name)


def query(name: str, schema: Schema, description: str = "", *, required: bool = False) -> Param:
    return Param(name, schema, description, required)


def repeated(name: str, item: Schema, description: str = "", *, required: bool = False) -> Param:
    """A parameter that may be given more than once (`params.strings`, `params.ids`, …)."""
    return Param(name, {"type": "array", "items": item}, description, required)


def choice(values: Iterable[str], default: str | None = None) -> Schema:
    """One of `values` (a set's sorted; otherwise in their order)."""
    ordered = sorted(values) if isinstance(values, frozenset | set) else list(values)
    found: Schema = {"type": "string", "enum": ordered}
    return found if default is None else found | {"default": default}


def integer(low: int | None, high: int | None, default: int | None = None) -> Schema:
    found: Schema = {"type": "integer"}
    for key, value in (("minimum", low), ("maximum", high), ("default", default)):
        if value is not None:
            found[key] = value
    return found


def page_and_limit() -> tuple[Param, Param]:
    """`params.page_and_limit`'s two (a `limit` above MAX_LIMIT is read as MAX_LIMIT)."""
    return (
        query("page", integer(1, MAX_PAGE, 1)),
        query("limit", integer(1, None, 10), f"above {MAX_LIMIT}, read as {MAX_LIMIT}"),
    )


def sorting(values: Iterable[str], default: str) -> Param:
    """`params.sorting`: repeatable, the first criterion decides first."""
    return Param("sorting", {"type": "array", "items": choice(values), "default": [default]})


def metadata(
    name: str = "metadata", text: str = "metadata[key]=value; repeat a key for any of values"
) -> Param:
    """`params.metadata`: `metadata[key]=value` (or of another `name`), the values of one key
    OR-ed."""
    schema = {"type": "object", "additionalProperties": {"type": "array", "items": STRING}}
    return Param(name, schema, text, deep_object=True)


def customers() -> tuple[Param, Param]:
    """The repeatable customer filters (a customer's events under either id are its own)."""
    return (repeated("customer_id", ID), repeated("external_customer_id", STRING))


def window(*, required: bool) -> tuple[Param, Param]:
    """`start_timestamp` and `end_timestamp` (`params.timestamp`)."""
    return (
        query("start_timestamp", DATETIME, required=required),
        query("end_timestamp", DATETIME, required=required),
    )


def timezone() -> Param:
    """`params.timezone`."""
    return query("timezone", {"type": "string", "default": "UTC"}, "an IANA timezone name")
