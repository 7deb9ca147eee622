"""Reads after writes across cores (Kafka mode): every answer says how far this core has applied
the control topic (`Meterline-Control-Offset`), and a request carrying `Meterline-Read-After`
(what an edge sends with the reads of an organization after answering its write elsewhere:
`ingest.http.cores`) is served once this core has applied that far: 503 `NotCaughtUp` if it
has not within `wait_seconds`, which an edge answers from another core."""

from __future__ import annotations

import asyncio
from typing import Protocol

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.http import OFFSET_HEADER, READ_AFTER_HEADER, error

WAIT_SECONDS = 5.0
_WANTED = READ_AFTER_HEADER.encode()
_OFFSET = OFFSET_HEADER.encode()


class Applied(Protocol):
    """How far this core has applied the control topic (`intake.control.ControlApplier`)."""

    @property
    def through(self) -> int: ...

    async def reached(self, offset: int) -> None: ...


def read_after(applied: Applied, wait_seconds: float = WAIT_SECONDS) -> Middleware:
    return Middleware(_ReadAfter, applied=applied, wait_seconds=wait_seconds)


class _ReadAfter:
    def __init__(self, app: ASGIApp, applied: Applied, wait_seconds: float) -> None:
        self._app = app
        self._applied = applied
        self._wait = wait_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        wanted = dict(scope["headers"]).get(_WANTED)
        if wanted is not None:
            if not wanted.isdigit():
                detail = f"{READ_AFTER_HEADER} should be a control topic offset, not {wanted!r}"
                return await error(400, "BadRequest", detail)(scope, receive, send)
            try:
                async with asyncio.timeout(self._wait):
                    await self._applied.reached(int(wanted))
            except TimeoutError:
                detail = f"This core has not applied the control topic up to {int(wanted)} yet."
                busy = error(503, "NotCaughtUp", detail, {"Retry-After": "1"})
                return await busy(scope, receive, send)

        async def offset_told(message: Message) -> None:
            if message["type"] == "http.response.start":
                through = str(self._applied.through).encode()
                message = {**message, "headers": [*message.get("headers", []), (_OFFSET, through)]}
            await send(message)

        await self._app(scope, receive, offset_told)
