"""A real `meterline up` process for benchmarks: fresh temp data dir, CPU and memory readings."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import httpx

from aggregator.api.shard_routing import ROUTED_HEADER
from aggregator.auth import TokenRegistry
from benchmarks.common import cpu_seconds, memory_kib
from tests.processes import MeterlineServer


class Server(MeterlineServer):
    """Starts on enter, SIGTERMs on exit. Without `data_dir`, on a fresh temp data dir that is
    removed afterwards; a given data dir (shared by a Kafka core and its edges) is left alone."""

    def __init__(
        self,
        *extra_args: str,
        command: str = "up",
        data_dir: Path | None = None,
        log_level: str = "warning",
        checkout: Path | None = None,
        port: int | None = None,
    ) -> None:
        """`checkout`: run that checkout's code (another commit's worktree) with this
        interpreter, instead of this one's; `port`: a killed server's, to take its place."""
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
        # `python -m` puts the working directory first on the module path.
        prefix = () if checkout is None else ("bash", "-c", 'cd "$0" && exec "$@"', str(checkout))
        super().__init__(
            data_dir,
            *extra_args,
            log_level=log_level,
            command=command,
            prefix=prefix,
            port=port,
        )

    @property
    def database(self) -> Path:
        return self.data_dir / "meterline.duckdb"

    def total_count(self, here: bool = False) -> int:
        """How many events the API says are stored (`GET /v1/events/?limit=1`); `here`: those
        this core holds (a shard's own, not merged with the other shards')."""
        headers = {"Authorization": f"Bearer {self.token}"}
        response = httpx.get(
            f"{self.url}/v1/events/",
            params={"limit": 1},
            headers={**headers, ROUTED_HEADER: "1"} if here else headers,
            timeout=120,
        )
        response.raise_for_status()
        return int(response.json()["pagination"]["total_count"])

    def cpu_seconds(self) -> tuple[float, float, float]:
        """CPU seconds of (the server process, its main thread = the event loop, its child
        processes = the validation workers)."""
        children = sum(cpu_seconds(child) for child in self.children())
        return cpu_seconds(self.pid), cpu_seconds(self.pid, self.pid), children

    def cpu_all(self) -> float:
        """CPU seconds of the server process and its validation workers."""
        total, _, workers = self.cpu_seconds()
        return total + workers

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            if self._owns_data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)


def served_organization(data_dir: Path) -> str:
    """The id of the organization `meterline up` serves from `data_dir`."""
    registry = TokenRegistry(data_dir)
    try:
        return registry.organization("default").id
    finally:
        registry.close()
