"""A local webhook receiver for the tests: keeps every request it reads whole (headers and
body) and answers with the status codes it is given, in turn (then 200), and with the body and
headers it is given (a hostile receiver's), if any."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.processes import free_port


@dataclass(frozen=True, slots=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    status: int  # what the receiver answered


class Receiver:
    def __init__(
        self,
        port: int | None = None,
        answers: list[int] | None = None,
        delay_seconds: float = 0,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.delay_seconds = delay_seconds
        self.body = body
        self.headers = headers or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.answers = list(answers or [])
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def answer_ok(self) -> None:
        """Answer every request from now on with 200 (the statuses given are dropped)."""
        with self._lock:
            self.answers.clear()

    def start(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender went away mid-request (a kill -9): no delivery, nothing kept;
                    # it sends the event again.
                    self.close_connection = True
                    return
                time.sleep(receiver.delay_seconds)  # a slow receiver
                with receiver._lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.received.append(
                        Received(dict(self.headers), body, time.time(), status)
                    )
                answer = b"thanks" if status < 300 else b"receiver failed"
                answer = answer if receiver.body is None else receiver.body
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender read what it keeps of a long answer, and left
                # A body of its own may be read in part: the connection is not used again.
                self.close_connection = receiver.body is not None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
