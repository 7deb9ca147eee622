"""A core's HTTP app in this process, for API tests that send many requests: `build_app` over a
real DuckDB file with the embedded publisher, served through httpx's ASGI transport (no socket,
no server), on one event loop kept for the app's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from aggregator.auth import TokenRegistry
from aggregator.backfill import Backfiller
from aggregator.core_app import CoreSettings, build_app
from aggregator.intake.embedded import EmbeddedPublisher
from aggregator.store import Store
from aggregator.store.compaction import compact
from aggregator.store.meter_tables import pending_backfills
from ingest.validation import ValidationPool

T = TypeVar("T")


class InProcessCore:
    """A context manager; `request()` answers like a client of `meterline up` would see."""

    def __init__(self, data_dir: Path) -> None:
        self.settings = CoreSettings(data_dir=data_dir)
        self._runner = asyncio.Runner()
        self._stack = contextlib.AsyncExitStack()
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
        publisher = EmbeddedPublisher(self.store, validation)
        self.app = build_app(self.store, self.registry, publisher, backfiller, self.settings)
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

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no meter is backfilling (the one write that follows a request)."""
        deadline = time.monotonic() + timeout
        while self.run(self.store.read(pending_backfills)):
            assert time.monotonic() < deadline, "backfills did not finish"
            self.run(asyncio.sleep(0.01))

    def table_counts(self) -> dict[str, int]:
        """Rows in every table: what a request that is refused must leave unchanged. Appended
        deltas are compacted first, so that the writer's own compaction between groups does
        not count as a change."""
        self.run(self.store.write(lambda tx: compact(tx.con)))

        def count(con: Any) -> dict[str, int]:
            tables = [
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_type = 'BASE TABLE' ORDER BY table_name"
                ).fetchall()
            ]
            union = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM \"{t}\"" for t in tables)
            return {name: n for name, n in con.execute(union).fetchall()}

        return self.run(self.store.read(count))
