"""SIGTERM ends the server within --drain-seconds, whatever is still running."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.processes import MeterlineServer


@pytest.mark.slow
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
        time.sleep(0.5)
        started = time.monotonic()
        server.stop(timeout=60)
        assert time.monotonic() - started < 3 + 1.5  # the bound, and process exit
