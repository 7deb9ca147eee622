"""uvicorn's HTTP protocol with a deadline for request headers.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but waits forever for the
headers of a request: a client that connects and sends nothing, or a header a byte at a time,
holds a socket and a file descriptor for good, and enough of them starve every tenant. Bodies
have their own deadline in the application (`Limits.body_timeout_seconds`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    class Protocol(HttpToolsProtocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_deadline is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expired(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return Protocol
