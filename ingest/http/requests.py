"""Reading requests: the bearer token and a size- and time-limited JSON body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from ingest.errors import BodyTimeout, BodyTooLarge
from ingest.http.responses import InvalidToken, Unauthorized
from meters.events import decode_json

# Resolves a bearer token to its organization id, or None when unknown/revoked.
Authenticate = Callable[[str], str | None]
T = TypeVar("T")


def organization_of(request: Request, authenticate: Authenticate) -> str:
    """The organization id of the request's bearer token (401 otherwise)."""
    return authenticated(request, authenticate)[1]


def bearer_subject(request: Request, authenticate: Callable[[str], T | None]) -> T:
    """Whom the request's bearer token names, as `authenticate` resolves it (401 otherwise):
    for kinds of token other than an organization's (customer sessions)."""
    return authenticated(request, authenticate)[1]


def authenticated(request: Request, authenticate: Callable[[str], T | None]) -> tuple[str, T]:
    """The request's bearer token and whom it names (401 otherwise)."""
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
    return token, org


async def read_body(
    request: Request,
    limit: int,
    timeout_seconds: float,
    grow: Callable[[int], None] | None = None,
) -> bytes:
    """The raw body: 413 past `limit` bytes (checked before and while reading), 408 when it
    has not all arrived within `timeout_seconds`. `grow(size)` is told every size the body
    reaches, the declared one first (to reserve memory for it, or refuse)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise BodyTooLarge(limit)
        if grow is not None:
            grow(int(declared))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                if grow is not None:
                    grow(size)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(timeout_seconds) from None
    return b"".join(chunks)


async def json_body(request: Request, limit: int, timeout_seconds: float) -> Any:
    return decode_json(await read_body(request, limit, timeout_seconds))
