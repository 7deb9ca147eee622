"""SIGTERM ends the server within --drain-seconds, whatever is still running."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.deadline import wait_for
from tests.processes import MeterlineServer

pytestmark = pytest.mark.processes


def test_sigterm_exits_within_the_drain_time_with_a_body_still_arriving(tmp_path: Path) -> None:
    server = MeterlineServer(tmp_path, "--drain-seconds", "3").start()
    assert server.token is not None
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        # A request whose body never finishes: graceful shutdown would wait for it.
        sock.sendall(
            b"POST /v1/events/ingest HTTP/1.1\r\nHost: meterline\r\n"
            b"Authorization: Bearer " + server.token.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            b'{"events": ['
        )
        with server.client() as client:
            wait_for("the server to read the body's start", lambda: _buffered(client) > 0)

        started = time.monotonic()
        server.stop()

        assert time.monotonic() - started < 3 + 1.5  # the bound, and process exit


def _buffered(client: httpx.Client) -> int:
    """The body bytes the server holds (`/metrics`)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("meterline_ingest_buffered_bytes "):
            return int(line.split()[-1])
    raise AssertionError("no meterline_ingest_buffered_bytes in /metrics")
