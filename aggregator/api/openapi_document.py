"""The OpenAPI 3.1 document of an app's declared routes (`openapi.ApiRoute`): paths and
operations from the declarations, one JSON Schema per shape from pydantic (request bodies as
they are validated, responses as they are built), the error responses every route shares.

The errors each operation lists: its own (`Operation.errors`), plus 401 with a token, 503 with
an organization's or a customer's token (a read past the store's read timeout: QueryTimeout),
422 with query parameters, a body or a path id (`params.path_id`), 404 with a path parameter,
and 408 and 413 with a body (`json_body`'s limits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode
from starlette.routing import BaseRoute, Mount

from aggregator.api.openapi import PATH_PARAMS, ApiRoute, Schema, Shape, Text
from ingest.http import ErrorBody, InvalidTokenBody, ValidationErrorBody

_JSON = "application/json"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class _Error:
    name: str
    description: str
    shape: Shape
    retry_after: bool = False


ERRORS: dict[int, _Error] = {
    401: _Error(
        "Unauthorized",
        "No bearer token (`Unauthorized`), or one that is unknown, revoked, expired or of the"
        " other kind (organization / customer session)",
        ErrorBody | InvalidTokenBody,
    ),
    404: _Error("NotFound", "Not in the token's organization (`ResourceNotFound`)", ErrorBody),
    408: _Error("RequestTimeout", "The body did not arrive in time", ErrorBody),
    409: _Error(
        "Conflict",
        "Against stored state: `MeterFailed`, `IdempotencyKeyReused`, `insufficient_balance`,"
        " `Conflict`",
        ErrorBody,
    ),
    413: _Error("RequestBodyTooLarge", "The body is over the size limit", ErrorBody),
    422: _Error(
        "ValidationFailed",
        "Every refused input, located by `loc` (`path`, `query` or `body` first)",
        ValidationErrorBody,
    ),
    429: _Error(
        "TooManyRequests", "Past the token's or organization's rate or share", ErrorBody, True
    ),
    503: _Error(
        "Unavailable",
        "Overloaded (`ServiceUnavailable`) or a read past the read timeout (`QueryTimeout`)",
        ErrorBody,
        True,
    ),
}
SECURITY_SCHEMES = {
    "organization_token": {
        "type": "http",
        "scheme": "bearer",
        "description": "An organization access token (`meterline token create`): every read"
        " and write is scoped to its organization.",
    },
    "customer_session": {
        "type": "http",
        "scheme": "bearer",
        "description": "A customer session token (`mlt_cst_…`, from `POST"
        " /v1/customer-sessions/`): one customer's portal routes only.",
    },
    "metrics_token": {
        "type": "http",
        "scheme": "bearer",
        "description": "`--metrics-token`, when the server was started with one.",
    },
}
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "organization": [{"organization_token": []}],
    "customer": [{"customer_session": []}],
    "metrics": [{}, {"metrics_token": []}],
    "none": [],
}
# Path parameters read by `params.path_id`: a malformed one is a 422.
_PATH_IDS = frozenset({"id"})

Schemas = dict[tuple[Shape, JsonSchemaMode], Schema]


def openapi_document(
    routes: Sequence[BaseRoute], *, title: str, version: str, description: str = ""
) -> dict[str, Any]:
    declared = list(_declared(routes, ""))
    schemas, components = _json_schemas(declared)
    paths: dict[str, dict[str, Any]] = {}
    for prefix, route in declared:
        path = prefix + route.openapi_path()
        paths.setdefault(path, {})[route.method.lower()] = _operation(path, route, schemas)
    tags = dict.fromkeys(route.operation.tag for _, route in declared)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "tags": [{"name": tag} for tag in tags],
        "security": _SECURITY["organization"],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {e.name: _error_response(e, schemas) for e in ERRORS.values()},
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _declared(routes: Sequence[BaseRoute], prefix: str) -> Iterator[tuple[str, ApiRoute]]:
    for route in routes:
        if isinstance(route, Mount):
            yield from _declared(route.routes, prefix + route.path)
        elif isinstance(route, ApiRoute) and route.include_in_schema:
            yield prefix, route


def _json_schemas(declared: list[tuple[str, ApiRoute]]) -> tuple[Schemas, Schema]:
    """Every shape's schema (a `$ref` for named ones), and the named ones' definitions."""
    wanted: list[tuple[Shape, JsonSchemaMode]] = [
        (e.shape, "serialization") for e in ERRORS.values()
    ]
    for _, route in declared:
        op = route.operation
        if op.body is not None:
            wanted.append((op.body, "validation"))
        wanted += [(s, "serialization") for s in op.responses.values() if _is_shape(s)]
    inputs = [(key, key[1], TypeAdapter(key[0])) for key in dict.fromkeys(wanted)]
    found, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    return {key: schema for (key, _), schema in found.items()}, definitions.get("$defs", {})


def _is_shape(body: Shape | Text | None) -> bool:
    return body is not None and not isinstance(body, Text)


def _operation(path: str, route: ApiRoute, schemas: Schemas) -> dict[str, Any]:
    op = route.operation
    found: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": "_".join(filter(None, [route.method.lower(), *_words(path)])),
    }
    if op.description:
        found["description"] = op.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]}
        for name in route.path_params()
    ] + [param.spec() for param in op.query]
    if parameters:
        found["parameters"] = parameters
    if op.body is not None:
        schema = schemas[(op.body, "validation")]
        found["requestBody"] = {"required": True, "content": {_JSON: {"schema": schema}}}
    responses = {str(s): _response(s, body, schemas) for s, body in op.responses.items()}
    for status in _errors(route):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status].name}"}
    found["responses"] = dict(sorted(responses.items()))
    found["security"] = _SECURITY[op.security]
    return found


def _words(path: str) -> list[str]:
    return [w.strip("{}").replace("-", "_") for w in path.split("/") if w not in ("", "v1")]


def _errors(route: ApiRoute) -> list[int]:
    op = route.operation
    found = set(op.errors)
    if op.security != "none":
        found.add(401)
    if op.security in ("organization", "customer"):
        found.add(503)
    if route.path_params():
        found.add(404)
    if op.query or op.body is not None or _PATH_IDS & set(route.path_params()):
        found.add(422)
    if op.body is not None:
        found |= {408, 413}
    return sorted(found)


def _response(status: int, body: Shape | Text | None, schemas: Schemas) -> dict[str, Any]:
    found: dict[str, Any] = {"description": HTTPStatus(status).phrase}
    if isinstance(body, Text):
        found["content"] = {body.media_type: {"schema": {"type": "string"}}}
    elif body is not None:
        found["content"] = {_JSON: {"schema": schemas[(body, "serialization")]}}
    return found


def _error_response(error: _Error, schemas: Schemas) -> dict[str, Any]:
    found: dict[str, Any] = {
        "description": error.description,
        "content": {_JSON: {"schema": schemas[(error.shape, "serialization")]}},
    }
    if error.retry_after:
        header = {"description": "Seconds to wait", "schema": {"type": "integer"}}
        found["headers"] = {"Retry-After": header}
    return found
