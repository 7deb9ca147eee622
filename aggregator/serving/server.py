"""The HTTP server a core or an edge serves with (uvicorn), and how it stops: on SIGINT/SIGTERM
a graceful shutdown bounded by `--drain-seconds` (then the process exits, whatever still runs),
or on an event a program running meterline inside itself sets (`Listening`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from aggregator.serving.listening import Listening
from aggregator.settings import CoreSettings
from ingest.http import Gate, http_protocol


async def serve_http(
    app: Starlette,
    settings: CoreSettings,
    log_level: str,
    banner: list[str],
    listening: Listening,
    *,
    gate: Gate | None = None,
    on_stop: Callable[[], None] = lambda: None,
    until: asyncio.Event | None = None,
) -> None:
    """Serve until stopped, or `until` is set (which calls `on_stop` first); once serving,
    print where, then the `banner` lines."""
    limits = settings.ingest.limits
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        http=http_protocol(limits.header_timeout_seconds, gate),
        timeout_keep_alive=max(1, round(limits.idle_timeout_seconds)),
        # Half the drain time for open requests; the rest for the store to close.
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds / 2)),
    )
    server = _Server(config)
    if listening.stop is None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, _stop, server, signum, settings.drain_seconds, on_stop)
    else:
        stopping = asyncio.create_task(_stop_on(listening.stop, server, on_stop))
    printing = asyncio.create_task(_banner(server, settings, banner, listening.started))
    ending = None if until is None else asyncio.create_task(_stop_on(until, server, on_stop))
    await server.serve(sockets=listening.sockets)
    printing.cancel()
    if ending is not None:
        ending.cancel()
    if listening.stop is not None:
        stopping.cancel()


async def _stop_on(
    event: asyncio.Event, server: uvicorn.Server, on_stop: Callable[[], None]
) -> None:
    """A graceful shutdown once `event` is set (no watchdog: the process is not ours to end)."""
    await event.wait()
    on_stop()
    server.should_exit = True


def _stop(
    server: uvicorn.Server, signum: int, drain_seconds: float, on_stop: Callable[[], None]
) -> None:
    """Begin a graceful shutdown, and make sure the process is gone `drain_seconds` later
    whatever is still running: nothing acknowledged is lost by exiting (every 2xx followed a
    commit or a Kafka ack), and a job cut short was never acknowledged."""
    on_stop()
    if not server.should_exit:
        watchdog = threading.Timer(drain_seconds, _exit_now, args=(drain_seconds,))
        watchdog.daemon = True
        watchdog.start()
    server.handle_exit(signum, None)


def _exit_now(drain_seconds: float) -> None:
    logging.getLogger(__name__).error(
        "still draining after %.1f s (--drain-seconds); exiting with work unfinished"
        " (none of it was acknowledged)",
        drain_seconds,
    )
    logging.shutdown()
    os._exit(1)


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM once it has shut down, which would end the process
    before the store drains and closes; `serve` installs handlers of its own instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _banner(
    server: uvicorn.Server,
    settings: CoreSettings,
    lines: list[str],
    started: Callable[[], None] | None,
) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.05)
    if started is not None:
        started()
    url = f"http://{settings.host}:{settings.port}"
    print(
        "\n".join([f"meterline is serving {url} (data in {settings.data_dir})", *lines]), flush=True
    )
