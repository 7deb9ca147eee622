"""deploy/nginx.conf, run by Debian's nginx (`make test` installs it): `nginx -t` accepts it,
and a running nginx sends every path to the edges (stand-ins that answer with their name, in
place of the Compose file's names), `/metrics` to no one; with one edge down or breaking off,
the other answers every request nginx may send again (any it could not deliver, and reads),
and a write the broken edge received is answered 502, not replayed."""

from __future__ import annotations

import contextlib
import http.server
import re
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deadline import seconds_left, wait_for
from tests.processes import free_port

pytestmark = pytest.mark.processes

CONF = Path(__file__).parents[2] / "deploy" / "nginx.conf"


def _stand_in(name: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Answer(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def _breaking() -> tuple[socketserver.ThreadingTCPServer, int]:
    """An edge killed while it holds the request: it reads it, then closes without a word."""

    class Break(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Break)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


@contextlib.contextmanager
def _nginx(prefix: Path, first: int, second: int) -> Iterator[str]:
    """nginx with the two edges' names pointed at these ports; its URL."""
    port = free_port()
    text = CONF.read_text()
    text = text.replace("server ingest-1:8001", f"server 127.0.0.1:{first}")
    text = text.replace("server ingest-2:8001", f"server 127.0.0.1:{second}")
    servers = re.findall(r"^\s+server (\S+?)[ ;]", text, re.M)
    assert servers == [f"127.0.0.1:{first}", f"127.0.0.1:{second}"], servers  # no other upstream
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    command = ["nginx", "-p", str(prefix), "-c", str(conf)]
    tested = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert tested.returncode == 0, tested.stderr
    running = subprocess.Popen(
        [*command, "-g", f"daemon off; pid {prefix}/nginx.pid;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"nginx to answer on {url}", lambda: _reachable(url))
        yield url
    finally:
        running.terminate()
        running.wait(max(seconds_left(), 10))


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    edge, edge_port = _stand_in("edge")
    try:
        with _nginx(tmp_path_factory.mktemp("nginx"), edge_port, edge_port) as url:
            yield url
    finally:
        edge.shutdown()


def _reachable(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.TransportError:
        return False
    return True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/events/ingest"),
        ("POST", "/api/v1/events"),  # OpenMeter's ingest (CloudEvents)
        ("GET", "/api/v1/events"),  # OpenMeter's event list: the edge sends it on (--core)
        ("GET", "/v1/customer-meters/check"),
        ("POST", "/v1/customers/"),
        ("GET", "/"),  # the console
    ],
)
def test_every_path_goes_to_the_edges(nginx: str, method: str, path: str) -> None:
    answer = httpx.request(method, f"{nginx}{path}", content=b"{}", timeout=10)
    assert (answer.status_code, answer.text) == (200, "edge")


def test_metrics_are_not_passed_on(nginx: str) -> None:
    assert httpx.get(f"{nginx}/metrics", timeout=10).status_code == 404


@pytest.mark.parametrize("down", ["refusing", "breaking"])
def test_one_edge_down_the_other_answers(tmp_path: Path, down: str) -> None:
    edge, edge_port = _stand_in("edge")
    broken, broken_port = _breaking() if down == "breaking" else (None, free_port())
    paths = ["/v1/events/ingest", "/api/v1/events", "/v1/customers/"]
    try:
        with _nginx(tmp_path, broken_port, edge_port) as url, httpx.Client(timeout=10) as client:
            # Round robin: requests meet the edge that is down first, until nginx leaves it out.
            statuses: list[int] = []
            for _ in range(6):
                assert client.get(f"{url}/v1/customer-meters/check").text == "edge"
                for path in paths:
                    answer = client.post(f"{url}{path}", content=b"{}")
                    statuses.append(answer.status_code)
                    assert answer.status_code == 502 or answer.text == "edge"
    finally:
        edge.shutdown()
        if broken is not None:
            broken.shutdown()
    # Never delivered: sent to the other edge. Delivered, maybe applied: not replayed (the
    # client sends it again, with its key).
    assert (502 in statuses) == (down == "breaking"), statuses
