"""Real meterline processes for tests and benchmarks: start, wait until serving, stop or kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MeterlineServer:
    """`meterline up` in a subprocess, on a free loopback port."""

    def __init__(self, data_dir: Path, *extra_args: str, log_level: str = "warning") -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.log_level = log_level
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.output: list[str] = []
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> Self:
        cmd = [
            sys.executable,
            "-m",
            "aggregator.cli",
            "up",
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
        ready = threading.Event()
        # Keep draining the pipe for the whole run: a full pipe would block the server.
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self._proc.poll() is not None:
            self.kill()
            raise RuntimeError("meterline did not start:\n" + "\n".join(self.output[-40:]))
        return self

    def _pump(self, ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.output.append(line.rstrip())
            if "development token" in line:
                self.token = line.split()[-1]
                ready.set()
            elif "token was revoked" in line:
                ready.set()
        ready.set()  # the process ended: stop waiting

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
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait: a graceful shutdown drains pending writes."""
        assert self._proc is not None
        started = time.perf_counter()
        self._proc.send_signal(signal.SIGTERM)
        self.exit_code = self._proc.wait(timeout)
        self.stop_seconds = time.perf_counter() - started
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
            except subprocess.TimeoutExpired:
                self.kill()


def token_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "token", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
