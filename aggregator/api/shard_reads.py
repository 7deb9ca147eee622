"""Customer reads on a shard of several (`--shard I/N`, N > 1) are answered by the customer's
shard, whichever core they reach.

1. A GET naming one customer (`customer_id` or `external_customer_id` given once in the query,
   or `/v1/customers/{id}/state`, `/v1/customers/external/{external_id}/state`), with an
   organization's token, is the customer's shard's to answer: the one owning the partition of
   the customer's routing key (`intake.routing`). Any other request is answered here.
2. When that is another shard, the request is sent to its live cores (as `GET /v1/cluster/`
   lists them), one after another, marked `Meterline-Routed` so that the core it reaches
   answers it itself; the first answer is this core's answer. None answering: 503
   `ShardUnavailable` naming the shard.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import httpx
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest.http import Authenticate, error

ROUTED_HEADER = "meterline-routed"
# The customer's shard's index, or None when this shard holds the customer.
Owner = Callable[[str, str | None, str | None], Awaitable[int | None]]
_CUSTOMER_PARAMS = ("customer_id", "external_customer_id")
# Hop-by-hop and framing headers: the answer is sent again whole.
_DROPPED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length"})


def shard_reads(
    authenticate: Authenticate,
    owner: Owner,
    cores: Callable[[int], list[str]],
    client: httpx.AsyncClient,
) -> Middleware:
    """`owner`: step 1's shard; `cores`: a shard's live cores' URLs; `client` sends step 2."""
    return Middleware(
        _ShardReads, authenticate=authenticate, owner=owner, cores=cores, client=client
    )


def customer_named(path: str, query: bytes) -> tuple[str | None, str | None] | None:
    """Step 1's customer: (customer id, external id), or None (not one customer's read)."""
    if path.startswith("/v1/customers/") and path.endswith("/state"):
        named = path.removeprefix("/v1/customers/").removesuffix("/state")
        if named.startswith("external/"):
            return None, named.removeprefix("external/") or None
        return (named, None) if _is_uuid(named) else None
    params = parse_qs(query.decode("latin-1"))
    given = [(name, params[name]) for name in _CUSTOMER_PARAMS if name in params]
    if len(given) != 1 or len(given[0][1]) != 1:
        return None
    name, (value,) = given[0]
    if name == "customer_id":
        return (value, None) if _is_uuid(value) else None
    return None, value


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class _ShardReads:
    def __init__(
        self,
        app: ASGIApp,
        authenticate: Authenticate,
        owner: Owner,
        cores: Callable[[int], list[str]],
        client: httpx.AsyncClient,
    ) -> None:
        self._app = app
        self._authenticate = authenticate
        self._owner = owner
        self._cores = cores
        self._client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shard = await self._elsewhere(scope) if scope["type"] == "http" else None
        if shard is None:
            return await self._app(scope, receive, send)
        answer = await self._sent(scope, shard)
        return await answer(scope, receive, send)

    async def _elsewhere(self, scope: Scope) -> int | None:
        """Step 1: the other shard whose read this is, or None."""
        headers = dict(scope["headers"])
        if scope["method"] != "GET" or ROUTED_HEADER.encode() in headers:
            return None
        customer = customer_named(scope["path"], scope["query_string"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if customer is None or scheme.lower() != "bearer" or not token.strip():
            return None
        organization = self._authenticate(token.strip())
        if organization is None:
            return None  # the route answers 401
        return await self._owner(organization, *customer)

    async def _sent(self, scope: Scope, shard: int) -> Response:
        """Step 2."""
        target = scope["path"] + (
            f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
        )
        headers = [(k, v) for k, v in scope["headers"] if k not in _DROPPED and k != b"host"]
        headers.append((ROUTED_HEADER.encode(), b"1"))
        for core in self._cores(shard):
            try:
                sent = await self._client.get(core + target, headers=headers)
            except httpx.HTTPError:
                continue
            if sent.status_code in (502, 503, 504):
                continue
            answer = Response(sent.content, sent.status_code)
            kept = [(k, v) for k, v in sent.headers.raw if k.lower() not in _DROPPED]
            answer.raw_headers = [*kept, (b"content-length", str(len(sent.content)).encode())]
            return answer
        return error(
            503,
            "ShardUnavailable",
            f"No core of shard {shard} (which holds this customer) answered; retry.",
            {"Retry-After": "1"},
        )
