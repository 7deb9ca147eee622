"""Snapshots on demand (`meterline backup`), served on the data dir's `control.sock` while a
core runs: whoever can reach the data dir (the socket's permissions are its owner's) can take
one, with no token, as whoever can read the data dir could copy it.

The protocol:

1. The client connects and writes one line, `snapshot`.
2. The core takes a snapshot (`take`, one at a time) into `<data dir>/served-snapshots/` and
   answers one JSON line: `{"snapshot": <its folder's name>}`, or `{"error": <why>}`.
3. The client copies the folder where it goes (`places.put`), then closes the connection; the
   core deletes the folder as the connection ends, so a client that dies mid-copy leaves
   nothing behind. Folders a killed core left are deleted at its next start.

A data dir on a file system without sockets: the core serves without one, and logs so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import orjson

from aggregator.backup.snapshots import Taken, take
from aggregator.errors import UsageError
from aggregator.store import Store
from ingest.tasks import cancel_within

log = logging.getLogger(__name__)

SOCKET = "control.sock"
SERVED = "served-snapshots"
REQUEST = b"snapshot\n"
REQUEST_SECONDS = 10.0  # for the request line (step 1)


@contextlib.contextmanager
def _in(data_dir: Path) -> Iterator[str]:
    """The socket's path through an open handle of the data dir: a path of any length (a
    socket's own is at most 107 bytes)."""
    handle = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{handle}/{SOCKET}"
    finally:
        os.close(handle)


class SnapshotSocket:
    """Steps 2 and 3 while entered (an async context manager)."""

    def __init__(self, store: Store, data_dir: Path, taken: Taken | None = None) -> None:
        self._store = store
        self._data_dir = data_dir
        self._taken = taken or Taken()
        self._one_at_a_time = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        shutil.rmtree(self._data_dir / SERVED, ignore_errors=True)
        # The store holds the data dir's lock: a socket left here is a dead core's.
        (self._data_dir / SOCKET).unlink(missing_ok=True)
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _in(self._data_dir) as path:
                listening.bind(path)
            os.chmod(self._data_dir / SOCKET, 0o600)
        except OSError as exc:  # a file system without sockets: the core serves on without
            listening.close()
            log.warning("no %s in the data dir (%s): `meterline backup` cannot ask", SOCKET, exc)
            return self
        self._server = await asyncio.start_unix_server(self._serve, sock=listening)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        await cancel_within(*self._handlers, what="snapshot socket")
        (self._data_dir / SOCKET).unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        taken: Path | None = None
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                line = await reader.readline()
            answer: dict[str, str] = {"error": f"unknown request {line[:40]!r}"}
            if line == REQUEST:
                try:
                    async with self._one_at_a_time:
                        taken = await take(self._store, self._data_dir, self._data_dir / SERVED)
                    self._taken.took()
                    answer = {"snapshot": taken.name}
                except Exception as exc:
                    self._taken.failed()
                    log.exception("a snapshot failed")
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
            writer.write(orjson.dumps(answer) + b"\n")
            await writer.drain()
            await reader.read()  # until the client is done with the folder (step 3)
        except (OSError, TimeoutError) as exc:
            log.warning("a snapshot request ended: %r", exc)
        finally:
            writer.close()
            if taken is not None:
                await asyncio.to_thread(shutil.rmtree, taken, True)
            self._handlers.discard(task)


@contextlib.contextmanager
def requested(data_dir: Path) -> Iterator[Path]:
    """Steps 1 and 3 as the client: the folder of a snapshot the core serving `data_dir` took,
    while in the block."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            with _in(data_dir) as path:
                conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise UsageError(
                f"no core serves the data dir {data_dir} (no {SOCKET} answers): start it, or"
                " pass its --data-dir"
            ) from None
        except PermissionError:
            raise UsageError(
                f"{data_dir / SOCKET}: permission denied (run as the core's user)"
            ) from None
        conn.sendall(REQUEST)
        with conn.makefile("rb") as answers:
            answer = orjson.loads(answers.readline() or b'{"error": "the core closed"}')
        if "error" in answer:
            raise UsageError(f"the core took no snapshot: {answer['error']}")
        yield data_dir / SERVED / answer["snapshot"]
