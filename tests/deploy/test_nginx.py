"""deploy/nginx.conf, run by Debian's nginx (`make test` installs it): `nginx -t` accepts it,
and a running nginx sends each path where the Compose file needs it, with the upstreams' names
pointed at two local stand-ins (a core and an edge that answer with their name): ingest, ours
and OpenMeter's, to the edges; OpenMeter's event list and every other path to the core;
`/metrics` to no one."""

from __future__ import annotations

import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port, wait_until

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


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    core, core_port = _stand_in("core")
    edge, edge_port = _stand_in("edge")
    port, prefix = free_port(), tmp_path_factory.mktemp("nginx")
    text = CONF.read_text()
    text = re.sub(r"server ingest-\d:8001", f"server 127.0.0.1:{edge_port}", text)
    text = text.replace("server core:8000;", f"server 127.0.0.1:{core_port};")
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
        wait_until(lambda: _reachable(url), 10)
        yield url
    finally:
        running.terminate()
        running.wait(10)
        core.shutdown()
        edge.shutdown()


def _reachable(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.TransportError:
        return False
    return True


@pytest.mark.parametrize(
    ("method", "path", "to"),
    [
        ("POST", "/v1/events/ingest", "edge"),
        ("POST", "/api/v1/events", "edge"),  # OpenMeter's ingest (CloudEvents)
        ("GET", "/api/v1/events", "core"),  # OpenMeter's event list
        ("GET", "/v1/meters/", "core"),
        ("POST", "/v1/customers/", "core"),
    ],
)
def test_each_path_goes_where_it_is_served(nginx: str, method: str, path: str, to: str) -> None:
    answer = httpx.request(method, f"{nginx}{path}", content=b"{}", timeout=10)
    assert (answer.status_code, answer.text) == (200, to)


def test_metrics_are_not_passed_on(nginx: str) -> None:
    assert httpx.get(f"{nginx}/metrics", timeout=10).status_code == 404
