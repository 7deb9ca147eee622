"""Real meterline processes for tests and benchmarks: start, wait until serving, stop or kill."""

from __future__ import annotations

import collections
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import httpx

from aggregator.auth import TokenRegistry
from aggregator.commands import tansu
from tests.deadline import seconds_left, wait_for, waited_too_long, watch

# One TLS context for every HTTP client of the tests: httpx loads its CA bundle anew for each
# client it makes (about 25 ms of CPU), and the tests make thousands (a client per server and
# token, a request per poll).
TLS = httpx.create_ssl_context()


def answers_health(url: str, timeout: float = 1.0) -> bool:
    """Whether the server at `url` answers `/healthz` with a 200 (not while unreachable)."""
    try:
        return httpx.get(f"{url}/healthz", timeout=timeout, verify=TLS).status_code == 200
    except httpx.TransportError:
        return False


# Idle connections are dropped before meterline closes them (`--idle-timeout-seconds`, 5 s):
# a request sent on one the server closes at that moment fails, and a loaded machine widens
# that moment.
LIMITS = httpx.Limits(keepalive_expiry=2.0)


def api_client(url: str, token: str | None) -> httpx.Client:
    """A client of the API at `url`, with `token` (as `Server.client` gives it)."""
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=url, headers=headers, timeout=30, verify=TLS, limits=LIMITS)


class Server(Protocol):
    """What a client's tests use of a running meterline: a process (`MeterlineServer`) or a
    thread (`tests.inprocess.ServedCore`)."""

    data_dir: Path
    url: str
    token: str | None

    def client(self, token: str | None = None) -> httpx.Client: ...


class _Killable(Protocol):
    def running(self) -> bool: ...

    def kill(self) -> None: ...


_started: weakref.WeakSet[_Killable] = weakref.WeakSet()


def kill_leftovers() -> int:
    """SIGKILL the servers and brokers that still run (a test that failed before stopping
    them): none outlives the session. How many there were."""
    left = [process for process in list(_started) if process.running()]
    for process in left:
        process.kill()
    return len(left)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` free ports in a row (`meterline cluster`'s), drawn below the range
    the kernel hands out, where `free_port` and every client's socket take theirs."""
    for _ in range(100):
        first = random.randrange(20000, 30000)
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise AssertionError(f"no {count} free ports in a row")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class MeterlineServer:
    """`meterline up` (or `core`, `ingest`) in a subprocess, on a free loopback port.

    Validation runs in the server process unless `validation_workers` says otherwise: each
    worker is one more interpreter to start (a second of CPU), and only the tests of the
    workers themselves need them."""

    def __init__(
        self,
        data_dir: Path,
        *extra_args: str,
        log_level: str = "warning",
        command: str = "up",
        validation_workers: int = 0,
        prefix: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        """`port`: a killed server's, to start another in its place (default: a free one)."""
        self.command = command
        self.prefix = tuple(prefix)  # runs the command (`nsenter ...`: another mount namespace)
        self.data_dir = data_dir
        self.extra_args = ("--validation-workers", str(validation_workers), *extra_args)
        self.log_level = log_level
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.output: list[str] = []
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self.echo = False

    def start(self) -> Self:
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "aggregator.cli",
            self.command,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _started.add(self)
        watch(self)
        ready = threading.Event()
        # Keep draining the pipe for the whole run: a full pipe would block the server.
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()

        def serving() -> bool:
            # `up` prints its banner (with the token) once serving; the others answer /healthz.
            serves = ready.is_set() if self.command == "up" else answers_health(self.url)
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError("meterline did not start:\n" + "\n".join(self.output[-40:]))
            return serves

        try:
            wait_for(f"{self.describe()} to serve", serving)
        except BaseException:
            self.kill()
            raise
        return self

    def describe(self) -> str:
        return f"meterline {self.command} on port {self.port}"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def last_lines(self, count: int) -> list[str]:
        return self.output[-count:]

    def _pump(self, ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.output.append(line.rstrip())
            if self.echo:
                print(f"[{self.command} {self.port}] {line.rstrip()}", flush=True)
            if line.startswith("development token"):
                self.token = line.split()[-1]
                ready.set()
            elif "token create" in line:  # no development token: the hint to create one
                ready.set()
        # The process closed its output: reap it first, so that start() sees it ended (its
        # exit can trail the pipe's end).
        self._proc.wait()
        ready.set()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def children(self) -> list[int]:
        """Child processes (the validation workers)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            found.extend(int(c) for c in (task / "children").read_text().split())
        return found

    def client(self, token: str | None = None) -> httpx.Client:
        return api_client(self.url, token or self.token)

    def stop(self) -> int:
        """SIGTERM and wait (on the test's deadline): a graceful shutdown drains pending
        writes."""
        assert self._proc is not None
        started = time.perf_counter()
        self._proc.send_signal(signal.SIGTERM)
        self.ended(f"{self.describe()} to stop on SIGTERM")
        self.stop_seconds = time.perf_counter() - started
        assert self.exit_code is not None
        return self.exit_code

    def ended(self, what: str | None = None) -> int:
        """The exit status of a server that stops by itself (on the test's deadline)."""
        assert self._proc is not None
        try:
            self.exit_code = self._proc.wait(seconds_left())
        except subprocess.TimeoutExpired:
            raise AssertionError(waited_too_long(what or f"{self.describe()} to exit")) from None
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything not already durable."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self.stop()
            except AssertionError:  # out of time (a failed test's teardown): no drain then
                self.kill()


def new_org_token(data_dir: Path, org: str) -> str:
    """A new token of the organization `org` (created if needed), made as `meterline token
    create` makes it, without an interpreter of its own (`test_cli` runs the command)."""
    registry = TokenRegistry(data_dir)
    try:
        return registry.create_token(registry.organization(org), "tests")
    finally:
        registry.close()


def edge_token(edge: Server, token: str) -> str:
    """`token` once `edge` accepts it: an edge takes tokens from the control topic, where the
    core publishes those of its data dir within about a second."""

    def accepted() -> bool:
        with edge.client(token) as client:
            return client.post("/v1/events/ingest", json={"events": []}).status_code != 401

    wait_for("the edge to accept a token from the control topic", accepted)
    return token


class Broker:
    """A Tansu broker (Kafka protocol, memory storage) on a free loopback port.

    Memory storage: a killed broker comes back empty. Pausing (SIGSTOP) keeps its log.
    """

    def __init__(self, advertised_port: int | None = None) -> None:
        """`advertised_port`: where clients are told the broker is (a TLS endpoint in front
        of it, `tests.tls`); its own port by default."""
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._advertised_port = advertised_port
        self._proc: subprocess.Popen[str] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)

    def start(self) -> Self:
        self._proc = subprocess.Popen(
            tansu.command(self.port, self._advertised_port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _started.add(self)
        watch(self)
        threading.Thread(target=self._pump, daemon=True).start()

        def listening() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError("tansu did not start:\n" + "\n".join(self._output))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        try:
            wait_for(f"{self.describe()} to listen", listening)
        except BaseException:
            self.kill()
            raise
        return self

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line.rstrip())

    def describe(self) -> str:
        return f"tansu broker on port {self.port}"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def last_lines(self, count: int) -> list[str]:
        return list(self._output)[-count:]

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.kill()
            self._proc.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
