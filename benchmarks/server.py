"""A real `meterline up` process for benchmarks: free port, fresh data dir, token from stdout."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from benchmarks.common import cpu_seconds, memory_kib


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command() -> list[str]:
    # Prefer the installed console script (what users run); fall back to the module.
    script = Path(sys.executable).with_name("meterline")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "aggregator.cli"]


class Server:
    """Starts on enter, SIGTERMs on exit; the data dir is removed afterwards."""

    def __init__(self, *, log_level: str = "warning") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
        self.token = ""
        self.output: list[str] = []
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        self._log_level = log_level
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def database(self) -> Path:
        return self.data_dir / "meterline.duckdb"

    def start(self, timeout: float = 60.0) -> None:
        self._proc = subprocess.Popen(
            [
                *_command(),
                "up",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                self._log_level,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ready = threading.Event()
        # Keep draining the pipe for the whole run: a full pipe would block the server.
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or not self.token:
            self.kill()
            raise RuntimeError("meterline did not start:\n" + "\n".join(self.output[-40:]))

    def _pump(self, ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.output.append(line.rstrip())
            if line.startswith("development token"):
                self.token = line.split()[-1]
                ready.set()
        ready.set()  # the process ended: stop waiting

    def total_count(self) -> int:
        """How many events the API says are stored (`GET /v1/events/?limit=1`)."""
        response = httpx.get(
            f"{self.url}/v1/events/",
            params={"limit": 1},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )
        response.raise_for_status()
        return int(response.json()["pagination"]["total_count"])

    def cpu_seconds(self) -> tuple[float, float, float]:
        """CPU seconds of (the server process, its main thread = the event loop, its child
        processes = the validation workers)."""
        children = sum(cpu_seconds(child) for child in self.children())
        return cpu_seconds(self.pid), cpu_seconds(self.pid, self.pid), children

    def children(self) -> list[int]:
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            found.extend(int(c) for c in (task / "children").read_text().split())
        return found

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then wait: a graceful shutdown drains pending writes before exiting."""
        assert self._proc is not None
        started = time.perf_counter()
        self._proc.send_signal(signal.SIGTERM)
        self.exit_code = self._proc.wait(timeout)
        self.stop_seconds = time.perf_counter() - started
        return self.exit_code

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._proc is not None and self._proc.poll() is None:
                self.stop()
        except subprocess.TimeoutExpired:
            self.kill()
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)
