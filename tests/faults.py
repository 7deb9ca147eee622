"""A loopback HTTP proxy that injects faults into ingest requests, for the clients that must
deliver every event exactly once through them (the forwarder, the SDK); a forwarding pair of
real meterlines (in threads of the test process) with the proxy between them; and a hostile
answer (`gzip_bomb`)."""

from __future__ import annotations

import collections
import contextlib
import functools
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.inprocess import ServedCore
from tests.processes import TLS, Server


class FaultProxy:
    """Relays to `upstream`, but answers the ingest requests (POSTs) as `script` says, in
    order: pass; 429 or 503 (Retry-After: `retry_after`; not relayed); 500 (not relayed);
    stall (relayed, then answered after `stall_seconds`, once the client gave up); reset
    (relayed, then the connection dropped unanswered); drop (the connection dropped, not
    relayed); lie (answered 200, not relayed). Once the script is used up, everything passes."""

    def __init__(
        self,
        upstream: str,
        script: list[str],
        *,
        retry_after: str = "1",
        stall_seconds: float = 2.0,
    ) -> None:
        self.upstream = upstream
        self.script = collections.deque(script)
        self.ingests: list[tuple[float, str]] = []  # (monotonic time, action)
        self.bodies: list[bytes] = []  # of the ingest requests, in order
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                self._relay(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = proxy.script.popleft() if proxy.script else "pass"
                proxy.ingests.append((time.monotonic(), action))
                proxy.bodies.append(body)
                if action in ("429", "503", "500"):
                    self.send_response(int(action))
                    if action != "500":
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "lie":  # acknowledged, never stored: a gap for reconcile
                    count = len(orjson.loads(body)["events"])
                    answer = orjson.dumps({"inserted": count, "duplicates": 0})
                    self._answer(httpx.Response(200, content=answer))
                    return
                if action in ("reset", "drop"):
                    if action == "reset":
                        self._forward(body)
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    return
                if action == "stall":
                    response = self._forward(body)
                    time.sleep(stall_seconds)  # the fault: a slow answer

                    self._answer(response)
                    return
                self._answer(self._forward(body))

            def _forward(self, body: bytes) -> httpx.Response:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                return httpx.request(
                    self.command,
                    proxy.upstream + self.path,
                    content=body,
                    headers=headers,
                    verify=TLS,
                )

            def _relay(self, body: bytes) -> None:
                self._answer(self._forward(body))

            def _answer(self, response: httpx.Response) -> None:
                try:
                    self.send_response(response.status_code)
                    for key in ("Content-Type", "Retry-After"):
                        if key in response.headers:
                            self.send_header(key, response.headers[key])
                    self.send_header("Content-Length", str(len(response.content)))
                    self.end_headers()
                    self.wfile.write(response.content)
                except OSError:
                    pass  # the client gave up (the stall)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


# Rollup mode that stages every half second and forwards periods as soon as they end.
ROLLUPS_NOW = (
    *("--upstream-mode", "rollup", "--upstream-settle-seconds", "0"),
    *("--upstream-stage-seconds", "0.5"),
)


@contextlib.contextmanager
def forwarding(
    tmp_path: Path, script: list[str], *edge_args: str, central_args: tuple[str, ...] = ()
) -> Iterator[tuple[Server, FaultProxy, Server]]:
    """A central meterline, a FaultProxy before it running `script`, and an edge forwarding
    to the central through the proxy; all started, and stopped on exit (the central last)."""
    with ServedCore(tmp_path / "central", *central_args) as central:
        proxy = FaultProxy(central.url, script)
        try:
            upstream = ("--upstream-url", proxy.url, "--upstream-token", central.token or "")
            with ServedCore(tmp_path / "edge", *upstream, *edge_args) as edge:
                yield central, proxy, edge
        finally:
            proxy.close()


def forwarded(client: httpx.Client) -> bool:
    """The edge's forwarder has sent something and has nothing left to send."""
    status = client.get("/v1/forwarder/").json()
    return bool(status["backlog"] == 0 and status["sent"] > 0)


@functools.cache
def gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip body of about a thousandth of its size that inflates to `inflated_mib` MiB of
    `a`. Made without compressing them all: after a full flush, deflate writes each further
    MiB the same, so one written MiB is repeated (the trailer's CRC is computed)."""
    mib = b"a" * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(mib, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (inflated_mib << 20) & 0xFFFFFFFF)
    body = first + again * (inflated_mib - 1) + deflate.flush(zlib.Z_FINISH)
    return header + body + trailer
