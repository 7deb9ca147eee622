"""Reading requests: the bearer token and a size-limited JSON body."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request

from ingest.errors import BodyTooLarge
from ingest.http.responses import InvalidToken, Unauthorized
from meters.errors import FieldError, ValidationFailed

# Resolves a bearer token to its organization id, or None when unknown/revoked.
Authenticate = Callable[[str], str | None]


def organization_of(request: Request, authenticate: Authenticate) -> str:
    """The organization id of the request's bearer token (401 otherwise)."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken
    org = authenticate(token)
    if org is None:
        raise InvalidToken
    return org


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 past `limit` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes) -> Any:
    """Decode JSON; 422 (json_invalid) otherwise. orjson rejects NaN, Infinity and numbers
    that overflow a double."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationFailed(
            [FieldError("json_invalid", ("body",), f"JSON decode error: {exc}", None)]
        ) from None


async def json_body(request: Request, limit: int) -> Any:
    return decode_json(await read_body(request, limit))
