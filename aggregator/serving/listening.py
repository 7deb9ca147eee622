"""Where a server listens and what stops it (`Listening`): made by the command
(`serving.command`), or by a program that runs meterline inside itself (the tests)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a server listens and what stops it. A process listens on `--host`/`--port` and
    stops on SIGINT/SIGTERM (`PROCESS`); a program that runs meterline inside itself (the
    tests, in a thread) hands it bound sockets and an event to set, as signals are not its.
    `started` is called once it serves (the start is over)."""

    sockets: list[socket.socket] | None = None
    stop: asyncio.Event | None = None
    started: Callable[[], None] | None = None


PROCESS = Listening()
