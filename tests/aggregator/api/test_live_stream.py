"""`GET /v1/customer-meters/stream` over HTTP on a real server: each organization's stream
carries its own customer meters as commits change them and never another's, filters narrow
it, an idle stream sends heartbeats, and a stopping server ends open streams instead of
waiting for them. Also: dead letters in the embedded pipeline say there are none to read, and
the console's files are package data (a `pip install .` serves them)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aggregator.services.live_feed import Subscription, Update
from tests.deadline import seconds_left, wait_for
from tests.inprocess import ServedCore
from tests.processes import Server, new_org_token

HEARTBEAT = "0.3"
ROOT = Path(__file__).parents[3]
TOKENS_METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


class EventStream:
    """The stream read in a thread: (arrival time, event name, data) per event, "comment" with
    the text for comments (`open`, `heartbeat`)."""

    def __init__(self, url: str, token: str, params: dict[str, str] | None = None) -> None:
        self.received: list[tuple[float, str, Any]] = []
        self.status: int | None = None
        self._stop = threading.Event()
        self._args = (url, token, params or {})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        url, token, params = self._args
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.stream(
            "GET", f"{url}/v1/customer-meters/stream", headers=headers, params=params, timeout=30
        ) as response:
            self.status = response.status_code
            buffer = ""
            for text in response.iter_text():
                buffer += text
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self.received.append((time.time(), *_parsed(block)))
                if self._stop.is_set():
                    return

    def events(self, name: str = "customer_meter") -> list[Any]:
        return [data for _, kind, data in list(self.received) if kind == name]

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    def wait_open(self) -> None:
        wait_for("the stream to open", lambda: "open" in self.events("comment") or self.ended)
        assert self.status == 200

    def close(self) -> None:
        self._stop.set()  # noticed at the next heartbeat at most
        self._thread.join(seconds_left())


def _parsed(block: str) -> tuple[str, Any]:
    name, data = "message", []
    for line in block.split("\n"):
        field, _, value = line.partition(":")
        if field == "":
            return "comment", value.strip()
        if field == "event":
            name = value.strip()
        elif field == "data":
            data.append(value.removeprefix(" "))
    return name, orjson.loads("\n".join(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedCore]:
    data_dir = tmp_path_factory.mktemp("live")
    args = ("--stream-heartbeat-seconds", HEARTBEAT)
    with ServedCore(data_dir, *args) as running:
        yield running


@pytest.fixture(scope="module")
def orgs(server: Server) -> dict[str, Any]:
    """Two organizations: A (alice, amy) and B (bob), each with a tokens meter."""
    found: dict[str, Any] = {"a": {"token": server.token}, "b": {}}
    found["b"]["token"] = new_org_token(server.data_dir, "rival")
    for org, customers in (("a", ["alice", "amy"]), ("b", ["bob"])):
        with server.client(found[org]["token"]) as http:
            found[org]["meter"] = http.post("/v1/meters/", json=TOKENS_METER).json()["id"]
            for name in customers:
                body = {"email": f"{name}@example.com", "external_id": name, "name": name}
                found[org][name] = http.post("/v1/customers/", json=body).json()["id"]
    return found


def _use(server: Server, token: str, customer: str, tokens: int) -> None:
    event = {"name": "call", "external_customer_id": customer, "metadata": {"tokens": tokens}}
    with server.client(token) as http:
        http.post("/v1/events/ingest", json={"events": [event]}).raise_for_status()


def test_each_organization_streams_its_own_changes_only(
    server: Server, orgs: dict[str, Any]
) -> None:
    a, b = orgs["a"], orgs["b"]
    streams = {
        "a": EventStream(server.url, a["token"]),
        "b": EventStream(server.url, b["token"]),
        "amy": EventStream(server.url, a["token"], {"customer_id": a["amy"]}),
    }
    try:
        for stream in streams.values():
            stream.wait_open()
        _use(server, a["token"], "alice", 5)
        _use(server, b["token"], "bob", 7)
        with server.client(a["token"]) as http:
            credit = {"customer_id": a["amy"], "meter_id": a["meter"], "units": 10}
            http.post("/v1/meter-credits/", json={**credit, "external_id": "g1"}).raise_for_status()

        def seen(stream: str, customer: str) -> list[Any]:
            return [e for e in streams[stream].events() if e["customer_id"] == customer]

        wait_for(
            "each organization's stream to carry its changes",
            lambda: seen("a", a["alice"]) and seen("a", a["amy"]) and seen("b", b["bob"]),
        )
        wait_for("amy's stream to carry her change", lambda: seen("amy", a["amy"]))
        assert seen("a", a["alice"])[-1]["consumed_units"] == 5
        assert seen("a", a["amy"])[-1]["balance"] == 10
        assert seen("b", b["bob"])[-1]["consumed_units"] == 7
        for name, org in (("a", a), ("b", b), ("amy", a)):
            for event in streams[name].events():
                assert event["meter_id"] == org["meter"], (name, event)
                assert event["customer_id"] in {org.get("alice"), org.get("amy"), org.get("bob")}
        assert {e["customer_id"] for e in streams["amy"].events()} == {a["amy"]}
    finally:
        for stream in streams.values():
            stream.close()


def test_an_idle_stream_sends_heartbeats(server: Server, orgs: dict[str, Any]) -> None:
    stream = EventStream(server.url, orgs["b"]["token"])
    try:
        stream.wait_open()
        wait_for("three heartbeats", lambda: stream.events("comment").count("heartbeat") >= 3)
        assert stream.events() == []
    finally:
        stream.close()


def test_the_stream_refuses_what_it_cannot_serve(server: Server, orgs: dict[str, Any]) -> None:
    url = f"{server.url}/v1/customer-meters/stream"
    assert httpx.get(url).status_code == 401
    with server.client(orgs["b"]["token"]) as http:
        session = http.post("/v1/customer-sessions/", json={"customer_id": orgs["b"]["bob"]})
        bad = http.get("/v1/customer-meters/stream", params={"customer_id": "nope"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "customer_id"]
    portal = {"Authorization": f"Bearer {session.json()['token']}"}
    assert httpx.get(url, headers=portal).status_code == 401


def test_a_subscription_coalesces_and_tells_one_that_fell_behind_to_reload() -> None:
    async def run() -> None:
        subscription = Subscription(frozenset({"m1"}), None, max_pending=3)
        subscription.offer({("m1", "id:a"), ("m2", "id:b")})  # m2: not followed
        subscription.offer({("m1", "id:a"), ("m1", "id:c")})  # coalesced with the first
        assert await subscription.next(1) == Update(
            frozenset({("m1", "id:a"), ("m1", "id:c")}), False
        )
        subscription.offer({("m1", f"id:{i}") for i in range(4)})  # more than it holds
        assert await subscription.next(1) == Update(frozenset(), True)
        subscription.offer({("m2", "id:a")})
        assert await subscription.next(0.05) is None  # nothing it follows: a heartbeat is due
        subscription.end()
        assert await subscription.next(1) is None and subscription.ended

    asyncio.run(run())


def test_embedded_dead_letters_say_there_are_none(server: Server, orgs: dict[str, Any]) -> None:
    with server.client(orgs["a"]["token"]) as http:
        found = http.get("/v1/dead-letters/")
    assert found.status_code == 200
    assert found.json() == {"kafka": False, "items": [], "complete": True, "counts": None}


@pytest.mark.processes
def test_the_console_files_are_package_data(tmp_path: Path) -> None:
    """What `pip install .` (the Dockerfile) lays out holds every file of the console: the
    wheel's package files, as setuptools' build_py copies them from pyproject's settings."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "aggregator", source / "aggregator", ignore=ignore)
    build = (
        "from setuptools.dist import Distribution\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "dist = Distribution({'script_name': 'setup.py'})\n"
        "apply_configuration(dist, 'pyproject.toml')\n"
        f"dist.get_command_obj('build_py').build_lib = {str(tmp_path / 'lib')!r}\n"
        "dist.run_command('build_py')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", build],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=seconds_left(),
    )
    assert done.returncode == 0, done.stderr
    static = ROOT / "aggregator" / "console" / "static"
    built = tmp_path / "lib" / "aggregator" / "console" / "static"
    wanted = sorted(p.name for p in static.iterdir())
    assert {"index.html", "portal.html", "app.js", "console.css"} <= set(wanted)
    assert sorted(p.name for p in built.iterdir()) == wanted


def test_stopping_the_server_ends_open_streams(server: Server, orgs: dict[str, Any]) -> None:
    """Last in the module: it stops the module's server. Without the streams ended as shutdown
    begins, uvicorn would wait drain/2 (15 s by default) for them."""
    stream = EventStream(server.url, orgs["a"]["token"])
    stream.wait_open()
    server.stop()
    assert server.stop_seconds is not None and server.stop_seconds < 10
    wait_for("the stream to end", lambda: stream.ended)
