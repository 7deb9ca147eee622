"""Organization-wide reads in a deployment of several shards (`shard_routing`, step 3). Each
shard holds its own customers' events; the route that is asked merges the other shards' parts
with its own, so that the answer is what one shard holding every event gives.

1. An event list's page p of l is among the first p × l events of each shard in the list's
   order (`event_tables.event_keys`: timestamp, ingest time, then id; an event's id is
   derived from where it was first read, so it is the same in every deployment; at most
   `MAX_REACH` deep, past it a 422 names `page`). A system event (a credit's, a reset's) is
   its customer's shard's, like the customer's events (`store.ledger_tables.Ledgers`).
   a. each shard gives the places (sort keys) of its first p × l events, and its total (mode
      `KEYS`; this shard's read here);
   b. merged in order, they say how many of each shard's events come before the page, and how
      many are on it;
   c. each shard with events on the page gives those (mode `SLICE`: `start`, `limit`), and
      they are merged in order. The total is the sum of the shards'. (`events`)
   So a page costs each shard a read of p × l places and of its events on the page.
2. Event names and types: every shard's (all its pages), added up per name and source
   (occurrences summed; first and last seen, and the time a type was first seen, the earliest
   and the latest), then sorted and cut as one shard sorts and cuts its own. (`names`)
3. A meter's quantities: each shard's partial aggregates, asked in mode `PARTIALS`
   (`meter_shapes.partials`), merged into this shard's, then reduced: partial aggregates of
   disjoint events merge (`meters.aggregations.Partial`). (`meter_routes`)
4. A customer is every shard's (the control topic), but its first event's time is known only
   where its events are: in a list of customers, an unknown one is asked of the other shards
   (`first_events`). (`customer_routes`)
5. Costs: every shard's report of the same range and grouping, added up exactly (decimal
   amounts, events, each period), per group, then sorted and cut as one shard does. Grouped by
   customer, a group is on one shard, so each shard's top groups are enough; otherwise each
   shard gives up to `cost_routes.MAX_GROUPS` groups, so the answer is exact while no shard
   has more (names, models and vendors rarely do). (`costs`)

6. A list of customers' rows (holds, customer meters, top-ups): a row is its customer's
   shard's, so page p of l is among each shard's first p × l rows (`MAX_REACH` deep), merged
   in the list's order (`rows`); the total is the sum of the shards'.

7. The live stream: this shard's changes and every other shard's stream (each customer's
   changes are its shard's), event by event; opened once all are (each subscribed: nothing
   committed after is missed), and ended when any ends (clients reconnect). (`live`)

8. An organization-wide correction (a void by ids or external ids, a replacement of every
   customer) is applied by every shard to the events it holds: the other shards' outcomes of
   the same record (asked with its key, `written`) are merged into this one's
   (`correction_shapes`: counts added, lists joined).

A shard none of whose cores answers makes the read a 503 `ShardUnavailable`; a shard's refusal
(a 4xx) is the answer, as it would be from one shard.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
from starlette.requests import Request

from aggregator.api.params import MAX_LIMIT
from aggregator.api.shapes import pagination
from aggregator.api.shard_routing import Peers
from aggregator.errors import ShardRefused
from aggregator.services.cost_service import decimal_text
from meters.errors import FieldError, ValidationFailed

# How deep an organization-wide event list may be paged (page × limit): each shard reads the
# places of that many events for every such page.
MAX_REACH = 10_000
# The modes of the requests shards send each other (`Meterline-Routed`), each what the route
# answers with.
KEYS = "keys"  # step 1a
SLICE = "slice"  # step 1c
PARTIALS = "partials"  # step 3
_PAGING = frozenset({"page", "limit", "start"})

Item = Any  # an answer's item, as JSON (the shapes' TypedDicts included)


def reach(page: int, limit: int) -> int:
    """Step 1's reach, p × l; a 422 past `MAX_REACH`."""
    if page * limit > MAX_REACH:
        raise ValidationFailed(
            [
                FieldError(
                    "page",
                    ("query", "page"),
                    f"Across shards, page × limit may be at most {MAX_REACH}; narrow the list"
                    " with start_timestamp and end_timestamp instead.",
                    page,
                )
            ]
        )
    return page * limit


async def _pages(peers: Peers, request: Request, pages: range) -> list[list[Any]]:
    """Every other shard's answers to a list `request` at `pages` (of `MAX_LIMIT`), as JSON."""
    queries = [[*kept(request), ("page", str(p)), ("limit", str(MAX_LIMIT))] for p in pages]
    return [[_json(a) for a in shard] for shard in await peers.fanned(request, queries, "1")]


async def each(
    peers: Peers, request: Request, query: list[tuple[str, str]], mode: str = "1"
) -> list[Any]:
    """Every other shard's answer to `request` with `query` in place of its own, marked `mode`,
    as JSON."""
    return [_json(shard[0]) for shard in await peers.fanned(request, [query], mode)]


async def written(peers: Peers, request: Request, body: bytes) -> list[Any]:
    """Every other shard's outcome of the write `request` applied here (sent again with its key
    and `body`), as JSON."""
    return [_json(answer) for answer in await peers.written(request, body)]


def kept(request: Request) -> list[tuple[str, str]]:
    """`request`'s query but its paging."""
    return [(k, v) for k, v in request.query_params.multi_items() if k not in _PAGING]


def _json(answer: httpx.Response) -> Any:
    if answer.status_code != 200:
        raise ShardRefused(answer.status_code, answer.content)
    return orjson.loads(answer.content)


# An event's place: timestamp, ingest time, source, order made (system events), id.
Key = tuple[int, int, str, int, str]
Keys = Callable[[int], Awaitable[tuple[list[Key], int]]]
Slice = Callable[[int, int], Awaitable[list[Item]]]


Place = tuple[Key, int]  # and the shard holding the event


def page_parts(
    places: list[Place], page: int, limit: int, desc: bool
) -> tuple[Counter[int], Counter[int], list[str]]:
    """Step 1b: of each shard, how many events come before page `page` of `limit` and how many
    are on it (of every shard's first page × limit places); and the page's ids, in order."""
    places = sorted(places, reverse=desc)  # an event is on one shard: keys are never equal
    before = Counter(index for _, index in places[: (page - 1) * limit])
    on = places[(page - 1) * limit : page * limit]
    return before, Counter(index for _, index in on), [key[-1] for key, _ in on]


async def events(
    peers: Peers, request: Request, keys: Keys, slice_: Slice, page: int, limit: int, desc: bool
) -> tuple[list[Item], int]:
    """Step 1, with this shard's places (`keys`, of a depth) and events (`slice_`, from a
    start, so many): the page and the total."""
    depth, base = reach(page, limit), kept(request)
    query = [*base, ("limit", str(depth))]
    (mine, total), theirs = await asyncio.gather(keys(depth), peers.fanned(request, [query], KEYS))
    found = [(_json(shard[0]), i) for shard, i in zip(theirs, peers.others(), strict=True)]
    places = [(key, peers.shard.index) for key in mine]
    places += [(tuple(key), index) for answer, index in found for key in answer["keys"]]
    before, on, ids = page_parts(places, page, limit, desc)
    total += sum(answer["total"] for answer, _ in found)

    async def part(index: int) -> list[Item]:
        if index == peers.shard.index:
            return await slice_(before[index], on[index])
        window = [("start", str(before[index])), ("limit", str(on[index]))]
        return list(_json(await peers.ask(index, request, [*base, *window], SLICE))["items"])

    parts = await asyncio.gather(*map(part, sorted(on)))
    by_id = {item["id"]: item for found_part in parts for item in found_part}
    return [by_id[i] for i in ids], total


async def first_events(peers: Peers, request: Request, customers: list[Item]) -> None:
    """Step 4: set the `first_user_event_at` that this shard does not know of the customers of
    a listed page (their events are on their shard) to the other shards', asked the page."""
    if all(c["first_user_event_at"] is not None for c in customers):
        return

    async def page(index: int) -> list[Item]:
        query = list(request.query_params.multi_items())
        return list(_json(await peers.ask(index, request, query, "1"))["items"])

    parts = await asyncio.gather(*(page(i) for i in peers.others()))
    found: dict[str, str] = {}
    for customer in (c for part in parts for c in part):
        at = customer["first_user_event_at"]
        if at is not None and (customer["id"] not in found or _at(at) < _at(found[customer["id"]])):
            found[customer["id"]] = at
    for customer in customers:
        customer["first_user_event_at"] = customer["first_user_event_at"] or found.get(
            customer["id"]
        )


async def every_page(peers: Peers, request: Request) -> list[list[Any]]:
    """Every other shard's whole list (step 2): its first page, then the rest of its pages."""
    first = await _pages(peers, request, range(1, 2))
    pages = max((s[0]["pagination"]["max_page"] for s in first), default=1)
    if pages <= 1:
        return first
    rest = await _pages(peers, request, range(2, pages + 1))
    return [a + b for a, b in zip(first, rest, strict=True)]


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def micros(iso: str) -> int:
    """An answer's time, in microseconds: to sort by, either way."""
    return (_at(iso) - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def newest_first(item: Item) -> tuple[int, str]:
    """The order of a list by `created_at`, newest first, then by `id` (holds, deliveries)."""
    return -micros(item["created_at"]), item["id"]


async def rows(
    peers: Peers | None,
    request: Request,
    listed: Callable[[int, int], Awaitable[Any]],
    order: Callable[[Item], Any],
    page: int,
    limit: int,
) -> Any:
    """Step 6 for a route whose answer at a page and limit is `listed(page, limit)` (this
    shard's), in the list's `order`: merged with the other shards' (`peers`; None: this
    shard's answer alone)."""
    if peers is None:
        return await listed(page, limit)
    depth = reach(page, limit)
    pages = range(1, -(-depth // MAX_LIMIT) + 1)
    first, theirs = await asyncio.gather(listed(1, depth), _pages(peers, request, pages))
    items, total = list(first["items"]), first["pagination"]["total_count"]
    for shard in theirs:
        total += shard[0]["pagination"]["total_count"]
        items += [item for answer in shard for item in answer["items"]]
    items.sort(key=order)
    start = (page - 1) * limit
    return {"items": items[start : start + limit], "pagination": pagination(total, limit)}


_NAME_KEYS: dict[str, Callable[[Item], Any]] = {
    "name": lambda n: n["name"],
    "label": lambda n: n["label"],
    "occurrences": lambda n: n["occurrences"],
    "first_seen": lambda n: _at(n["first_seen"]),
    "last_seen": lambda n: _at(n["last_seen"]),
}


def names(
    mine: list[Item], theirs: list[list[Any]], sorting: list[str], page: int, limit: int
) -> tuple[list[Item], int]:
    """Step 2: this shard's every name merged with the other shards'; one page, and the total."""
    merged: dict[tuple[str, str], Item] = {}
    for item in mine + [i for shard in theirs for answer in shard for i in answer["items"]]:
        key = (item["name"], item["source"])
        if key not in merged:
            merged[key] = dict(item)
            continue
        found = merged[key]
        found["occurrences"] += item["occurrences"]
        found["first_seen"] = min(found["first_seen"], item["first_seen"], key=_at)
        found["last_seen"] = max(found["last_seen"], item["last_seen"], key=_at)
        if found.get("created_at") is not None:  # a type's, unless it is a system one's
            found["created_at"] = min(found["created_at"], item["created_at"], key=_at)
    found_all = sorted(merged.values(), key=lambda n: (n["name"], n["source"]))
    for criterion in reversed(sorting):  # as `event_type_service.list_` sorts
        found_all.sort(key=_NAME_KEYS[criterion.removeprefix("-")], reverse=criterion[0] == "-")
    start = (page - 1) * limit
    return found_all[start : start + limit], len(found_all)


def costs(mine: Item, theirs: list[Any], limit: int, ascending: bool) -> Item:
    """Step 5: this shard's cost report merged with the other shards'."""
    reports = [mine, *theirs]
    groups: dict[tuple[tuple[str, str | None], ...], Item] = {}
    for group in (g for report in reports for g in report["groups"]):
        key = tuple(group["key"].items())
        found = groups.get(key)
        if found is None:
            groups[key] = found = dict(group)
            if "periods" in group:
                found["periods"] = [dict(p) for p in group["periods"]]
            continue
        _add(found, group)
        for period, more in zip(found.get("periods", ()), group.get("periods", ()), strict=True):
            _add(period, more)
    # As `cost_queries.compute` orders them: by amount, ties by the key's values, nulls last.
    ordered = sorted(
        groups.values(), key=lambda g: [(v is None, v or "") for v in g["key"].values()]
    )
    ordered.sort(key=lambda g: Decimal(g["amount"]), reverse=not ascending)
    total: Item = {"amount": "0", "currency": "usd", "events": 0}
    for report in reports:
        _add(total, report["total"])
    return {"total": total, "groups": ordered[:limit]}


# Comments (`:` lines: a stream's opening and heartbeats) are each stream's own.
_COMMENT = b":"
_BACKLOG = 1024  # events waiting for a slow client, past which the streams wait for it


async def live(
    peers: Peers,
    request: Request,
    mine: AsyncIterator[bytes],
    marks: tuple[bytes, bytes],
    heartbeat_seconds: float,
) -> AsyncIterator[bytes]:
    """Step 7: `mine` (this shard's stream of server-sent events, its first chunk sent once
    subscribed) merged with the other shards' streams of `request`, opened here (a shard that
    does not open its stream makes the answer its refusal, or 503); `marks` are the comments
    sent first and after `heartbeat_seconds` without an event."""
    found = await asyncio.gather(
        *(peers.opened(i, request) for i in peers.others()), return_exceptions=True
    )
    theirs = [answer for answer in found if isinstance(answer, httpx.Response)]
    refused = next((e for e in found if isinstance(e, BaseException)), None)
    if refused is not None:
        for answer in theirs:
            await answer.aclose()
        raise refused
    return _merged([mine, *(a.aiter_raw() for a in theirs)], theirs, marks, heartbeat_seconds)


async def _merged(
    sources: list[AsyncIterator[bytes]],
    theirs: list[httpx.Response],
    marks: tuple[bytes, bytes],
    heartbeat_seconds: float,
) -> AsyncIterator[bytes]:
    opened, heartbeat = marks
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(_BACKLOG)
    subscribed = [asyncio.Event() for _ in sources]

    async def pump(chunks: AsyncIterator[bytes], started: asyncio.Event) -> None:
        pending = b""
        try:
            async for chunk in chunks:
                started.set()
                *events, pending = (pending + chunk).split(b"\n\n")
                for event in events:
                    if event and not event.startswith(_COMMENT):
                        await queue.put(event + b"\n\n")
        finally:
            started.set()
            await queue.put(None)

    tasks = [asyncio.create_task(pump(c, e)) for c, e in zip(sources, subscribed, strict=True)]
    try:
        await asyncio.gather(*(e.wait() for e in subscribed))
        yield opened
        while True:
            try:
                async with asyncio.timeout(heartbeat_seconds):
                    event = await queue.get()
            except TimeoutError:
                yield heartbeat
                continue
            if event is None:  # a stream ended: so does this one
                return
            yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for answer in theirs:
            await answer.aclose()


def _add(found: Item, more: Item) -> None:
    found["amount"] = decimal_text(Decimal(found["amount"]) + Decimal(more["amount"]))
    found["events"] += more["events"]
