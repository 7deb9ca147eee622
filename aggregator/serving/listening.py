"""Where a server listens and what stops it (`Listening`): made by the command
(`serving.command`), or by a program that runs meterline inside itself (the tests)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a server listens and what stops it. A process listens on `--host`/`--port` and
    stops on SIGINT/SIGTERM (`PROCESS`); a program that runs meterline inside itself (the
    tests, in a thread) hands it bound sockets and an event to set, as signals are not its."""

    sockets: list[socket.socket] | None = None
    stop: asyncio.Event | None = None


PROCESS = Listening()
