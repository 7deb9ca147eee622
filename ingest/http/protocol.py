"""uvicorn's HTTP protocol with a deadline for request headers, and a gate that may answer a
request from its headers alone.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but waits forever for the
headers of a request: a client that connects and sends nothing, or a header a byte at a time,
holds a socket and a file descriptor for good, and enough of them starve every tenant. Bodies
have their own deadline in the application (`Limits.body_timeout_seconds`).

A request the application would refuse without reading its body (a tenant over its rate or its
share: `edge.ingest_gate`) is answered here once its headers are parsed, and the connection is
closed: its body is never read, nor the application run. Otherwise a flood's refused requests
cost the event loop that serves every tenant their whole bodies (a 1,000-event body is ~100 KB,
received and parsed only to be dropped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# A request's method, path and headers (lower-case names) -> the whole answer to send before
# closing the connection, or None to serve the request as usual.
Gate = Callable[[bytes, bytes, list[tuple[bytes, bytes]]], bytes | None]


def http_protocol(
    header_timeout_seconds: float, gate: Gate | None = None
) -> type[asyncio.Protocol]:
    class Protocol(HttpToolsProtocol):
        _header_deadline: asyncio.TimerHandle | None = None
        _refused = False  # answered by the gate: the rest of what arrives is dropped

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            if self._refused:
                return
            super().on_message_begin()
            if self._header_deadline is None:
                self._arm()

        def on_url(self, url: bytes) -> None:
            if not self._refused:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if not self._refused:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            if self._refused:
                return
            if gate is not None:
                path = httptools.parse_url(self.url).path
                answer = gate(self.parser.get_method(), path, self.headers)
                if answer is not None:
                    self._refused = True
                    self.transport.write(answer)
                    self.transport.close()
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_deadline = self.loop.call_later(header_timeout_seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expired(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return Protocol
