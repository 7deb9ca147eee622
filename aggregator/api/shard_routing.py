"""A customer's requests on a shard of several (`--shard I/N`, N > 1) are answered by the
customer's shard, whichever core they reach: only that shard has the customer's events and
ledger (`store.ledger_tables.Ledgers`).

1. A request is one customer's when it names exactly one:
   - a GET with `customer_id` or `external_customer_id` given once in the query, or of
     `/v1/customers/{id}` or `/v1/customers/external/{external_id}` (the customer: every shard
     has it, but only its shard has its events, whose first time it shows) or their `/state`;
   - a credit, reset or hold made (`POST /v1/meter-credits/`, `/v1/meter-resets/`,
     `/v1/meter-holds/`), by its body's `customer_id` or `external_customer_id` (the body read
     whole, up to `MAX_BODY_BYTES`);
   - a correction of one customer's events (`POST /v1/events/void` by a filter, by the
     filter's customer; `POST /v1/events/replace` naming one, dry runs too), whose events only
     its shard has (the body read whole, up to the API's default body limit);
   - a customer's PATCH giving an `external_id`: that external id's (its events' shard checks
     that none of them names it, `customer_service.update`).
   With an organization's token, it is the shard's that owns the partition of the customer's
   routing key (`intake.routing`). Any other request is answered here; a read of one
   customer this shard holds, here alone (marked as in step 2: nothing to fan out).
2. When that is another shard, the request is sent to that shard's live cores (as
   `GET /v1/cluster/` lists them), one after another, marked `Meterline-Routed` so that the
   core it reaches answers it itself; a write keeps its `Idempotency-Key` (given one if it has
   none, before it is sent or applied anywhere), so that sent again it is the same request,
   applied once. The first answer is this core's answer; none: 503 `ShardUnavailable`.
3. What this core cannot place before applying is answered by the shard that can:
   - a credit, reset or hold this shard applied and refused as another shard's customer
     (421 `CustomerElsewhere`: the customer was not yet known here when step 1 looked) is
     sent, with its key, to the customer's shard, whose outcome of the same record is the
     answer;
   - a hold, customer meter (or its grants), webhook event, event to amend or void job by id
     (`/v1/meter-holds/{id}`, `/v1/customer-meters/{id}` and `/grants`,
     `/v1/webhooks/events/{id}/redeliver`, `PATCH /v1/events/{id}`, `/v1/events/void/{id}`)
     not found here is asked of the other shards in turn (a write with its key and body): the
     first that has it answers; none: this core's 404 (503 if a shard did not answer).
4. An organization-wide read that shards answer in part (event lists, names and types, a
   meter's quantities over all customers, costs, customers, holds, customer meters, webhook
   deliveries, the live stream) is asked by its route of one live core of every other shard
   (`Peers`, concurrently, marked as in step 2) and merged with this shard's part there
   (`api.fan_out`). A customer's live stream is sent on as it comes (step 2). So is an
   organization-wide correction (a void by ids, a replacement of every customer), which every
   shard applies to its own events: each answers its outcome of the same record (its key).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import orjson
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aggregator.errors import ShardRefused, ShardUnavailable
from ingest.http import (
    HOP_BY_HOP,
    Authenticate,
    InvalidToken,
    Unauthorized,
    error,
    is_stream,
    organization_of,
    relayed,
    streamed,
)
from ingest.kafka import Shard
from ingest.settings import MAX_BODY_BYTES as DEFAULT_BODY_BYTES

ROUTED_HEADER = "meterline-routed"
MAX_BODY_BYTES = 64 * 1024  # a credit's, hold's or customer's body is a few hundred bytes
# A replacement brings up to 10,000 events: read up to the API's default body limit.
MAX_CORRECTION_BYTES = DEFAULT_BODY_BYTES
# The customer's shard's index, or None when this shard holds the customer.
Owner = Callable[[str, str | None, str | None], Awaitable[int | None]]
Customer = tuple[str | None, str | None]  # customer id, external customer id
_CUSTOMER_PARAMS = ("customer_id", "external_customer_id")
_WRITES = frozenset({"/v1/meter-credits/", "/v1/meter-resets/", "/v1/meter-holds/"})
# Corrections of one customer's events: a void's filter names it, a replacement its body.
_CORRECTIONS = {"/v1/events/void": "filter", "/v1/events/replace": None}
# Step 3's rows asked by id: (before the id, after it, the methods).
_BY_ID = (
    ("/v1/meter-holds/", "", frozenset({"GET", "DELETE"})),
    ("/v1/customer-meters/", "", frozenset({"GET"})),
    ("/v1/customer-meters/", "/grants", frozenset({"GET"})),
    ("/v1/webhooks/events/", "/redeliver", frozenset({"POST"})),
    ("/v1/events/void/", "", frozenset({"GET"})),  # before the events': the first prefix rules
    ("/v1/events/", "", frozenset({"PATCH"})),
)
_KEY = b"idempotency-key"
_STREAMS = frozenset({"/v1/customer-meters/stream"})  # answers that never end: relayed as they come
_NOT_SENT_ON = frozenset({h.encode() for h in HOP_BY_HOP} | {b"host"})


@dataclass(frozen=True, slots=True)
class Peers:
    """The deployment's other shards, as this core reaches them: `cores` gives a shard's live
    cores' URLs, leaders first."""

    shard: Shard
    cores: Callable[[int], list[str]]
    client: httpx.AsyncClient

    async def send(
        self,
        shard: int,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stream: bool = False,
    ) -> httpx.Response:
        """Steps 2 to 4: the first answer of one of the shard's live cores (502-504 are not
        answers), read whole; or, with `stream`, a stream's answer left open, read as it comes
        with no read timeout (its heartbeats keep it going; the caller closes it)."""
        timeout = httpx.Timeout(self.client.timeout.connect, read=None) if stream else None
        for core in self.cores(shard):
            request = self.client.build_request(
                method, core + target, headers=headers, content=body, timeout=timeout
            )
            try:
                sent = await self.client.send(request, stream=True)
                if stream and is_stream(sent):
                    return sent
                try:
                    await sent.aread()
                finally:
                    await sent.aclose()
            except httpx.HTTPError:
                continue
            if sent.status_code not in (502, 503, 504):
                return sent
        raise ShardUnavailable(shard)

    def others(self) -> list[int]:
        """The other shards' indexes, in order."""
        return [i for i in range(self.shard.count) if i != self.shard.index]

    async def ask(
        self,
        shard: int,
        request: Request,
        query: list[tuple[str, str]],
        mode: str,
    ) -> httpx.Response:
        """Step 4: `request` asked of `shard` with `query` in place of its own, marked `mode`
        (what the route answers with)."""
        headers = _marked(request.headers.raw, mode)
        target = f"{request.url.path}?{urlencode(query)}"
        return await self.send(shard, "GET", target, headers, b"")

    async def written(self, request: Request, body: bytes) -> list[httpx.Response]:
        """Step 4 of a write: `request` (its key, `body`) asked of every other shard at once,
        marked, as it was applied here: each answers its outcome of the same record."""
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = _marked(request.headers.raw)
        asked = (self.send(i, request.method, target, headers, body) for i in self.others())
        return list(await asyncio.gather(*asked))

    async def opened(self, shard: int, request: Request) -> httpx.Response:
        """Step 4: `request`'s stream on `shard`, open (`ShardRefused`: it answered otherwise)."""
        headers = _marked(request.headers.raw)
        target = f"{request.url.path}?{request.url.query}"
        sent = await self.send(shard, "GET", target, headers, b"", stream=True)
        if not is_stream(sent):
            raise ShardRefused(sent.status_code, sent.content)
        return sent

    async def fanned(
        self, request: Request, queries: Sequence[list[tuple[str, str]]], mode: str
    ) -> list[list[httpx.Response]]:
        """Step 4: every other shard's answers to `request` asked with each of `queries`."""

        async def shard(index: int) -> list[httpx.Response]:
            return list(await asyncio.gather(*(self.ask(index, request, q, mode) for q in queries)))

        return list(await asyncio.gather(*map(shard, self.others())))


def routed(request: Request) -> str | None:
    """How another core marked this request (`Peers`): None when a client sent it."""
    return request.headers.get(ROUTED_HEADER)


@dataclass(frozen=True, slots=True)
class Sharding:
    """What a shard of several routes by: `owner` decides step 1, `peers` sends 2 to 4."""

    owner: Owner
    peers: Peers


def shard_routing(authenticate: Authenticate, sharding: Sharding) -> Middleware:
    """Steps 1 to 3."""
    return Middleware(_ShardRouting, authenticate=authenticate, sharding=sharding)


def customer_named(path: str, query: bytes) -> Customer | None:
    """Step 1's customer of a GET, or None (not one customer's read)."""
    if path.startswith("/v1/customers/"):  # the customer or its state: its first event's time
        named = path.removeprefix("/v1/customers/").removesuffix("/state")
        if named.startswith("external/"):
            return None, named.removeprefix("external/") or None
        return (named, None) if _is_uuid(named) else None
    params = parse_qs(query.decode("latin-1"))
    given = [(name, params[name]) for name in _CUSTOMER_PARAMS if name in params]
    if len(given) != 1 or len(given[0][1]) != 1:
        return None
    name, (value,) = given[0]
    return _customer(name, value)


def customer_written(body: bytes, within: str | None = None) -> Customer | None:
    """Step 1's customer of a credit's or hold's body (of its member `within`, a void's
    filter), or None (the route says what is wrong)."""
    found = _object(body)
    if found is not None and within is not None:
        inner = found.get(within)
        found = inner if isinstance(inner, dict) else None
    if found is None:
        return None
    given = [(name, found[name]) for name in _CUSTOMER_PARAMS if found.get(name) is not None]
    if len(given) != 1 or not isinstance(given[0][1], str):
        return None
    return _customer(*given[0])


def external_id_given(body: bytes) -> Customer | None:
    """Step 1's customer of a customer's PATCH: the external id its body gives, whose events
    its shard holds (where `customer_service.update` checks that none names it)."""
    found = _object(body)
    given = None if found is None else found.get("external_id")
    return (None, given) if isinstance(given, str) and given else None


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        found = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def _customer(name: str, value: str) -> Customer | None:
    if name == "customer_id":
        return (value, None) if _is_uuid(value) else None
    return (None, value) if value else None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class _ShardRouting:
    def __init__(self, app: ASGIApp, authenticate: Authenticate, sharding: Sharding) -> None:
        self._app = app
        self._authenticate = authenticate
        self._owner = sharding.owner
        self._peers = sharding.peers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or ROUTED_HEADER.encode() in dict(scope["headers"]):
            return await self._app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        body: bytes | None = None
        if method == "GET":
            customer = customer_named(path, scope["query_string"])
        elif method == "POST" and path in _WRITES:
            scope = _keyed(scope)
            body, receive = await _read(receive)
            customer = None if body is None else customer_written(body)
        elif method == "POST" and path in _CORRECTIONS:
            scope = _keyed(scope)
            body, receive = await _read(receive, MAX_CORRECTION_BYTES)
            customer = None if body is None else customer_written(body, _CORRECTIONS[path])
        elif method == "PATCH" and path.startswith("/v1/customers/"):
            scope = _keyed(scope)
            body, receive = await _read(receive)
            customer = None if body is None else external_id_given(body)
        else:
            customer = None
        by_id = _by_id(method, path)
        if by_id and method != "GET":
            scope = _keyed(scope)
        if by_id and method == "PATCH":  # sent on with its body (step 3)
            body, receive = await _read(receive, MAX_CORRECTION_BYTES)
        shard = None if customer is None else await self._elsewhere(scope, customer)
        if shard is not None:
            answer = await self._sent(scope, shard, body or b"")
            return await answer(scope, receive, send)
        if customer is not None and method == "GET":  # all of it is here: no fan-out (step 4)
            scope = {**scope, "headers": [*scope["headers"], (ROUTED_HEADER.encode(), b"1")]}
        if not by_id and (customer is None or method != "POST"):
            return await self._app(scope, receive, send)
        status, here = await _answered(self._app, scope, receive)  # step 3
        if status == 421 and customer is not None:
            shard = await self._elsewhere(scope, customer)
            if shard is not None:
                answer = await self._sent(scope, shard, body or b"")
                return await answer(scope, receive, send)
        elif status == 404 and by_id and (body is not None or method != "PATCH"):
            found = await self._found(scope, body or b"")
            if found is not None:
                return await found(scope, receive, send)
        for message in here:
            await send(message)

    async def _elsewhere(self, scope: Scope, customer: Customer) -> int | None:
        """Step 1: the other shard whose request this is, or None."""
        try:
            organization = organization_of(Request(scope), self._authenticate)
        except (Unauthorized, InvalidToken):
            return None  # the route answers 401
        return await self._owner(organization, *customer)

    async def _found(self, scope: Scope, body: bytes) -> Response | None:
        """Step 3: the answer of the other shard that has the row asked by id, or None."""
        unavailable = None
        for shard in self._peers.others():
            try:
                sent = await self._peers.send(shard, *_request(scope), body)
            except ShardUnavailable as exc:
                unavailable = exc.shard
                continue
            if sent.status_code != 404:
                return relayed(sent.status_code, sent.headers.multi_items(), sent.content)
        if unavailable is None:
            return None
        return _unavailable(unavailable, "which may hold it")

    async def _sent(self, scope: Scope, shard: int, body: bytes) -> Response:
        """Step 2 (a stream sent on as it comes)."""
        stream = scope["path"] in _STREAMS
        try:
            sent = await self._peers.send(shard, *_request(scope), body, stream=stream)
        except ShardUnavailable:
            return _unavailable(shard, "which holds this customer")
        if stream and is_stream(sent):
            return streamed(sent)
        return relayed(sent.status_code, sent.headers.multi_items(), sent.content)


def _request(scope: Scope) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    """The scope's request as another core is sent it, marked (`ROUTED_HEADER`)."""
    query = scope["query_string"].decode("latin-1")
    target = scope["path"] + (f"?{query}" if query else "")
    return scope["method"], target, _marked(scope["headers"])


def _unavailable(shard: int, why: str) -> Response:
    return error(
        503,
        "ShardUnavailable",
        f"No core of shard {shard} ({why}) answered; retry.",
        {"Retry-After": "1"},
    )


def _by_id(method: str, path: str) -> bool:
    """Step 3: a hold, customer meter, webhook event, event to amend or void job asked by id."""
    for before, after, methods in _BY_ID:
        named = path.removeprefix(before)
        if named != path and named.endswith(after):
            return method in methods and _is_uuid(named.removesuffix(after))
    return False


def _keyed(scope: Scope) -> Scope:
    """Step 2: the write with an `Idempotency-Key`, its own or one given now."""
    if any(k.lower() == _KEY for k, _ in scope["headers"]):
        return scope
    return {**scope, "headers": [*scope["headers"], (_KEY, f"shard-{uuid.uuid4().hex}".encode())]}


async def _answered(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[int, list[Message]]:
    """This core's answer, kept to be sent or replaced (step 3: small JSON answers)."""
    messages: list[Message] = []

    async def keep(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, keep)
    [status] = [m["status"] for m in messages if m["type"] == "http.response.start"]
    return int(status), messages


def _marked(headers: list[tuple[bytes, bytes]], mode: str = "1") -> list[tuple[bytes, bytes]]:
    """A request's headers as another core is sent them (its own host, length and framing),
    marked `mode` (`ROUTED_HEADER`)."""
    kept = [(k, v) for k, v in headers if k.lower() not in _NOT_SENT_ON]
    return [*kept, (ROUTED_HEADER.encode(), mode.encode())]


async def _read(receive: Receive, limit: int = MAX_BODY_BYTES) -> tuple[bytes | None, Receive]:
    """The request's body (None past `limit`: the route refuses it, or answers it here), and a
    `receive` that gives the app the same messages again."""
    messages: list[Message] = []
    size, more = 0, True
    while more and size <= limit:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    whole = not more and all(m["type"] == "http.request" for m in messages)
    body = b"".join(m.get("body", b"") for m in messages) if whole else None

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay
