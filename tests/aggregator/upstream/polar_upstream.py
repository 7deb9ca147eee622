"""A Polar-compatible ingest endpoint for the forwarder's tests: answers every request as
inserted and keeps who sent which external ids when (a core given `URL/NAME` as its upstream
is NAME here)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from tests.processes import free_port


@dataclass(frozen=True, slots=True)
class Forwarded:
    core: str  # the first step of the path the core was given ("a", "b"; "v1" with none)
    at: float  # when the request began to arrive (time.time())
    external_ids: tuple[str, ...]


class Upstream:
    """A Polar-compatible ingest endpoint answering every request as inserted, keeping who
    sent which external ids when."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Forwarded] = []
        self._lock = threading.Lock()

    def received(self) -> list[Forwarded]:
        with self._lock:
            return list(self.requests)

    def ids(self, core: str | None = None) -> collections.Counter[str]:
        return collections.Counter(
            i for r in self.received() if core in (None, r.core) for i in r.external_ids
        )

    @contextmanager
    def serving(self) -> Iterator[Upstream]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                began = time.time()  # the request line read: sent, whatever comes after
                events = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ids = tuple(e["external_id"] for e in events["events"])
                with upstream._lock:
                    upstream.requests.append(Forwarded(self.path.split("/")[1], began, ids))
                answer = orjson.dumps({"inserted": len(ids), "duplicates": 0})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
