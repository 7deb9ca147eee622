"""meterline inside the test process, where a new interpreter is not the point:

- `InProcessCore`: a core's HTTP app for API tests that send many requests: `build_app` over a
  real DuckDB file with the embedded publisher, served through httpx's ASGI transport (no
  socket, no server), on one event loop kept for the app's lifetime.
- `ServedCore`: `meterline up` (or `core`) as the command composes it (`serving.core.serve`),
  served by uvicorn from a thread on a real loopback socket: what a client of the command sees,
  without the second or two of a new interpreter. Kills and restarts need processes
  (`tests.processes.MeterlineServer`).
- `run_cli`: a command (`meterline token list`, `reconcile`, ...) as `cli.main` runs it: its
  exit status and what it printed. The installed command itself is `test_cli`'s."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import uvloop

from aggregator import cli
from aggregator.auth import TokenRegistry
from aggregator.background import Backfiller, Voider
from aggregator.core_app import build_app
from aggregator.export.exporter import Exporter
from aggregator.intake.embedded import EmbeddedPublisher
from aggregator.serving import core, edge
from aggregator.serving.command import settings_of
from aggregator.serving.listening import Listening
from aggregator.settings import CoreSettings, ExportSettings, WebhookSettings
from aggregator.store import Store
from aggregator.store.tables.meter_tables import pending_backfills
from ingest.validation import ValidationPool
from tests.deadline import seconds_left, wait_for
from tests.processes import answers_health, api_client

T = TypeVar("T")
# A meter of each kind whose rows have a relation of their own: a count by a dimension
# (`rollup_groups`), a sum and a max (`rollups`), unique (`rollup_values`), latest
# (`rollup_points`): what makes a row of every derived relation (`create_meters`).
EVERY_RELATION_METERS: list[tuple[dict[str, Any], list[str]]] = [
    ({"func": "count"}, ["model"]),
    ({"func": "sum", "property": "n"}, []),
    ({"func": "max", "property": "n"}, []),
    ({"func": "unique", "property": "n"}, []),
    ({"func": "latest", "property": "n"}, []),
]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`meterline ARGS` run in this process: the status the command would exit with and what
    it printed (argparse's refusals included)."""
    # Text streams over bytes, as a process's are: a command may write bytes (`.buffer`).
    out, err = io.BytesIO(), io.BytesIO()
    text_out = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    text_err = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(text_out), contextlib.redirect_stderr(text_err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    printed = [stream.getvalue().decode() for stream in (out, err)]
    return subprocess.CompletedProcess(["meterline", *args], code, *printed)


def data_dir_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`meterline ARGS --data-dir DATA_DIR` (a command reading the data dir: token, org)."""
    return run_cli(*args, "--data-dir", str(data_dir))


def token_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return data_dir_cli(data_dir, "token", *args)


class InProcessCore:
    """A context manager; `request()` answers like a client of `meterline up` would see."""

    def __init__(
        self, data_dir: Path, *, private_webhooks: bool = False, export_to: Path | None = None
    ) -> None:
        """`private_webhooks`: webhook endpoints on loopback taken without resolving a name
        (no sender runs here); `export_to`: an exporter to that folder, whose steps the test
        takes (`exporter.step()`: none runs in the background), and its status route."""
        self.settings = CoreSettings(data_dir=data_dir)
        if private_webhooks:
            self.settings = replace(self.settings, webhooks=WebhookSettings(allow_private=True))
        self._runner = asyncio.Runner()
        self._stack = contextlib.AsyncExitStack()
        self._export_to = export_to
        self.exporter: Exporter | None = None
        self.registry = TokenRegistry(data_dir)
        self.token = self.registry.create_token(self.registry.organization("default"), "tests")

    def __enter__(self) -> Self:
        self.run(self._start())
        return self

    async def _start(self) -> None:
        enter = self._stack.enter_async_context
        self.store = await enter(Store(self.settings.database))
        validation = await enter(ValidationPool(self.settings.ingest.rules, workers=0))
        backfiller = await enter(Backfiller(self.store))
        self.voider = await enter(Voider(self.store))
        publisher = EmbeddedPublisher(self.store, validation)
        if self._export_to is not None:
            self.exporter = Exporter(self.store, ExportSettings(str(self._export_to)))
        self.app = build_app(
            self.store, self.registry, publisher, backfiller, self.settings, exporter=self.exporter
        )
        # A 500 comes back as the response a client would get, not as a raised exception.
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = await enter(
            httpx.AsyncClient(
                transport=transport,
                base_url="http://meterline",
                headers={"Authorization": f"Bearer {self.token}"},
            )
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self._runner.close()
            self.registry.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.run(self.client.request(method, path, **kwargs))

    def create_meters(self, meters: list[tuple[dict[str, Any], list[str]]]) -> list[str]:
        """Meters of no filter, each (aggregation, dimensions), named after their function;
        their ids."""
        ids = []
        for aggregation, dimensions in meters:
            body = {
                "name": aggregation["func"],
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": aggregation,
                "dimensions": dimensions,
            }
            answer = self.request("POST", "/v1/meters/", json=body)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
        return ids

    def settle(self) -> None:
        """Wait until no meter is backfilling (the one write that follows a request)."""

        def settled() -> bool:
            self.run(asyncio.sleep(0.01))  # the backfiller's loop runs only while asked to
            return not self.run(self.store.read(pending_backfills))

        wait_for("the backfills to finish", settled)

    def voids_done(self) -> None:
        """Wait until every void job running is done."""
        self.run(self.voider.idle())

    def table_counts(self) -> dict[str, int]:
        """Rows in every table: what a request that is refused must leave unchanged. The
        ledger's checkpoint is taken first, so that the flusher's own between requests does
        not count as a change. Write outcomes are not counted: a write refused in the writer
        keeps its refusal by request id, so that a resend is refused alike
        (`tests/aggregator/api/test_request_ids.py`). Nor are the merger's merges: counted
        once none is due, the segments stay as counted until something is stored. Counted once
        no meter is backfilling (`settle`)."""
        self.settle()
        self.run(self.store.checkpoint_ledger())
        wait_for("the due merges", lambda: not self.store.live.segments.due())

        def count(con: Any) -> dict[str, int]:
            tables = [
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_type = 'BASE TABLE' AND table_name != 'command_outcomes'"
                    " ORDER BY table_name"
                ).fetchall()
            ]
            union = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM \"{t}\"" for t in tables)
            return {name: n for name, n in con.execute(union).fetchall()}

        return self.run(self.store.read(count))


class ServedCore:
    """A context manager, answering as `tests.processes.MeterlineServer` does (`url`, `token`:
    the development token, `client()`, `stop()`), with the server in a thread of this process.
    Validation runs inline unless `extra_args` say `--validation-workers N`: the workers'
    processes are what a thread saves, and the rules are the same either way."""

    def __init__(
        self, data_dir: Path, *extra_args: str, command: str = "up", dev_token: bool = True
    ) -> None:
        """`dev_token`: make the development token in the data dir first (`token`); else the
        core has what its control topic gives it."""
        self.data_dir = data_dir
        self._dev_token = dev_token
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = cli.parse(
            [
                command,
                *("--data-dir", str(data_dir), "--port", str(self.port)),
                *("--validation-workers", "0", *extra_args),
            ]
        )
        self.token: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"meterline-{self.port}")
        self.stop_seconds: float | None = None
        self.exit_code: int | None = None  # 0 once stopped cleanly, as the command exits

    def start(self) -> Self:
        if self._args.command == "up" and self._dev_token:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            registry = TokenRegistry(self.data_dir)
            try:
                self.token = registry.development_token(registry.organization("default"))
            finally:
                registry.close()
        self._thread.start()

        def serving() -> bool:
            if self._failed is not None or not self._thread.is_alive():
                raise RuntimeError("meterline did not start") from self._failed
            return answers_health(self.url)

        wait_for(
            f"meterline {self._args.command} in a thread on port {self.port} to serve", serving
        )
        return self

    def _run(self) -> None:
        settings, kafka, forward = settings_of(self._args)
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                self._loop = runner.get_loop()
                self._stop = asyncio.Event()
                listening = Listening([self._socket], self._stop)
                if self._args.command == "ingest":
                    assert kafka is not None
                    served = edge.serve_edge(
                        settings, kafka, log_level="warning", listening=listening
                    )
                else:
                    served = core.serve(
                        settings,
                        kafka,
                        forward,
                        log_level="warning",
                        banner=False,
                        listening=listening,
                    )
                runner.run(served)
        except BaseException as exc:  # noqa: BLE001 - reported by start() and stop()
            self._failed = exc

    def client(self, token: str | None = None) -> httpx.Client:
        return api_client(self.url, token or self.token)

    def stop(self) -> None:
        """A graceful shutdown, as SIGTERM gives the command: pending writes are drained (on
        the test's deadline)."""
        started = time.perf_counter()
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(seconds_left())
        self.stop_seconds = time.perf_counter() - started
        self._socket.close()
        assert not self._thread.is_alive(), "meterline did not stop in time:\n" + self._stuck()
        if self._failed is not None:
            raise RuntimeError("meterline failed") from self._failed
        self.exit_code = 0

    def _stuck(self) -> str:
        """Where the server's thread and its tasks are (what a hang needs to be found)."""
        frame = sys._current_frames().get(self._thread.ident or 0)
        lines = ["thread:", *traceback.format_stack(frame)] if frame else []
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                shown = io.StringIO()
                task.print_stack(file=shown)
                lines.append(shown.getvalue())
        return "".join(lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
