"""Reads after writes across cores (Kafka mode): every answer says how far this core has applied
the control topic (`Meterline-Control-Offset`), and a request carrying `Meterline-Read-After`
(what an edge sends with the reads of an organization after answering its write elsewhere:
`ingest.http.cores`) is served once this core has applied that far: 503 `NotCaughtUp` if it
has not within `wait_seconds`, which an edge answers from another core.

Events likewise (`ingest.http.positions`): a request carrying `Meterline-Events-After` (an
ingest's answer names it; an edge sends it with an organization's corrections) is served once
this core has applied each partition it reads up to there, and a correction sent here is, in
any case, applied after the events this core itself acknowledged to its organization."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.http import (
    EVENTS_AFTER_HEADER,
    OFFSET_HEADER,
    READ_AFTER_HEADER,
    Acknowledged,
    error,
    format_positions,
    is_correction,
    merged,
    parse_positions,
)

WAIT_SECONDS = 5.0
POLL_SECONDS = 0.01  # how often a request waiting for events looks again
_WANTED = READ_AFTER_HEADER.encode()
_OFFSET = OFFSET_HEADER.encode()
_EVENTS = EVENTS_AFTER_HEADER.encode()


class Applied(Protocol):
    """How far this core has applied the control topic (`intake.control.ControlApplier`)."""

    @property
    def through(self) -> int: ...

    async def reached(self, offset: int) -> None: ...


@dataclass(frozen=True, slots=True)
class EventsApplied:
    """How far this core has applied the events topic: the next offset per partition
    (`applied`), of the partitions it reads (`owns`); and where the events acknowledged here
    are (`acknowledged`), per organization (`organization`: of a bearer token)."""

    applied: Callable[[], Mapping[int, int]]
    owns: Callable[[int], bool]
    acknowledged: Acknowledged
    organization: Callable[[str], str | None]

    def behind(self, wanted: Mapping[int, int]) -> bool:
        applied = self.applied()
        return any(self.owns(p) and applied.get(p, 0) < o for p, o in wanted.items())


def read_after(
    applied: Applied, events: EventsApplied, wait_seconds: float = WAIT_SECONDS
) -> Middleware:
    return Middleware(_ReadAfter, applied=applied, events=events, wait_seconds=wait_seconds)


class _ReadAfter:
    def __init__(
        self, app: ASGIApp, applied: Applied, events: EventsApplied, wait_seconds: float
    ) -> None:
        self._app = app
        self._applied = applied
        self._events = events
        self._wait = wait_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        headers = dict(scope["headers"])
        wanted = headers.get(_WANTED)
        if wanted is not None:
            if not wanted.isdigit():
                detail = f"{READ_AFTER_HEADER} should be a control topic offset, not {wanted!r}"
                return await error(400, "BadRequest", detail)(scope, receive, send)
            try:
                async with asyncio.timeout(self._wait):
                    await self._applied.reached(int(wanted))
            except TimeoutError:
                detail = f"This core has not applied the control topic up to {int(wanted)} yet."
                return await _busy(detail)(scope, receive, send)
        events = self._events_wanted(scope, headers)
        if events is None:
            detail = f"{EVENTS_AFTER_HEADER} should be partition:offset[,partition:offset...]"
            return await error(400, "BadRequest", detail)(scope, receive, send)
        if events and self._events.behind(events):
            try:
                async with asyncio.timeout(self._wait):
                    # Applied on the writer's thread, which has no loop to tell: looked at.
                    while self._events.behind(events):  # noqa: ASYNC110
                        await asyncio.sleep(POLL_SECONDS)
            except TimeoutError:
                detail = (
                    "This core has not applied the events topic up to"
                    f" {format_positions(events)} yet."
                )
                return await _busy(detail)(scope, receive, send)

        async def offset_told(message: Message) -> None:
            if message["type"] == "http.response.start":
                through = str(self._applied.through).encode()
                message = {**message, "headers": [*message.get("headers", []), (_OFFSET, through)]}
            await send(message)

        await self._app(scope, receive, offset_told)

    def _events_wanted(self, scope: Scope, headers: dict[bytes, bytes]) -> dict[int, int] | None:
        """The positions a request waits for (None: a header that names none): its header's,
        and a correction's organization's events acknowledged here, which the request then
        carries on (to the shard it may be sent to)."""
        given = headers.get(_EVENTS)
        wanted = parse_positions(given.decode("latin-1")) if given is not None else {}
        if wanted is None or not is_correction(scope["method"], scope["path"]):
            return wanted
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        organization = self._events.organization(token) if token else None
        own = self._events.acknowledged.of(organization) if organization else {}
        if own:
            wanted = merged(wanted, own)
            kept = [(k, v) for k, v in scope["headers"] if k != _EVENTS]
            scope["headers"] = [*kept, (_EVENTS, format_positions(wanted).encode())]
        return wanted


def _busy(detail: str) -> ASGIApp:
    return error(503, "NotCaughtUp", detail, {"Retry-After": "1"})
