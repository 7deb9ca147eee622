"""Validation of ingest bodies, off the event loop's process when bodies are large.

Decoding and checking cost about two JSON parses per event (`meters.events.validate_body`),
holding the GIL. In the process that also owns DuckDB they would contend with the writer thread
for that lock, so large bodies are validated in worker processes, which return the events already
encoded for their destination (`encode`: Arrow IPC for the store, columnar records for Kafka).
Small bodies are validated inline: a process round trip costs more than they do. Under 16 KiB
(`INLINE_BELOW_BYTES`) a body takes the loop that serves every tenant about a millisecond at
most; a 64 KiB body took 4-5 ms, which another tenant's request could wait behind.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from types import TracebackType
from typing import Self, TypeVar

import pyarrow as pa

from meters.errors import FieldError, ValidationFailed
from meters.events import EventRules
from meters.events import validate_body as validate_events
from meters.pricing import Pricing

T = TypeVar("T")
# Events as `meters.events.COLUMNS` -> what the destination takes; it must pickle (a class or
# module-level function, or a partial of one).
Encode = Callable[[pa.Table], T]
log = logging.getLogger(__name__)
# Added to the workers' niceness (lower CPU priority than the server process).
WORKER_NICENESS = 10
INLINE_BELOW_BYTES = 16 * 1024


def validate_body(
    body: bytes,
    received_at_us: int,
    rules: EventRules,
    encode: Encode[T],
    pricing: Pricing | None = None,
) -> tuple[T, Counter[str]] | list[FieldError]:
    """Decode and validate an ingest body (priced with `pricing`); the encoded events and what
    could not be priced, or every error found.

    Errors are returned, not raised, so that they cross the process boundary as plain data.
    """
    unpriced: Counter[str] = Counter()
    try:
        events = validate_events(
            body, now=received_at_us, rules=rules, pricing=pricing, unpriced=unpriced
        )
    except ValidationFailed as exc:
        return exc.errors
    return encode(events), unpriced


class ValidationPool:
    """Validates ingest bodies inline or in `workers` processes (and runs other CPU-bound
    decoding there: the consumer's records). An async context manager."""

    def __init__(
        self,
        rules: EventRules,
        *,
        workers: int,
        inline_below_bytes: int = INLINE_BELOW_BYTES,
    ) -> None:
        self._rules = rules
        self._workers = workers
        self._inline_below = inline_below_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._warming: list[Future[None]] = []

    def start(self) -> None:
        """Start the worker processes without waiting for them (entering waits until each one
        runs): a process starts them first, so that they start while it makes the rest."""
        if self._workers > 0 and self._pool is None:
            self._pool = self._new_pool()
            self._warming = [self._pool.submit(_warm) for _ in range(self._workers)]

    def close(self) -> None:
        """Stop the workers, if any run (leaving the context does; so does a start that failed
        before it entered)."""
        if self._pool is not None:
            self._pool.shutdown(True, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> Self:
        self.start()
        # Every worker runs before the pool is used, not from the first request on.
        await asyncio.gather(*(asyncio.wrap_future(started) for started in self._warming))
        return self

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: a fork would copy the parent's threads (DuckDB's among them) mid-flight.
        return ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    async def validate(
        self,
        body: bytes,
        received_at_us: int,
        encode: Encode[T],
        pricing: Pricing | None = None,
        unpriced: Counter[str] | None = None,
    ) -> T:
        """The encoded events of `body`, priced with `pricing` (what it could not price is
        counted into `unpriced`). Raises ValidationFailed listing every error."""
        job = partial(validate_body, body, received_at_us, self._rules, encode, pricing)
        result = job() if len(body) < self._inline_below else await self.run(job)
        if isinstance(result, list):
            raise ValidationFailed(result)
        encoded, found = result
        if unpriced is not None:
            unpriced.update(found)
        return encoded

    async def run(self, job: Callable[[], T]) -> T:
        """`job()` in a worker process (it must pickle), or here when there are no workers."""
        pool = self._pool
        if pool is None:
            return job()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, job)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the pool refuses all work from now on.
            # Replace it, and run this job here rather than fail it.
            log.error("a worker process died; starting a new pool")
            if self._pool is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            return job()


def _warm() -> None:
    return None


def _init_worker(parent: int) -> None:
    """Worker initializer: exit when the server dies, even by SIGKILL (which gives the pool no
    chance to stop its workers, otherwise they would linger as orphans); run at a lower
    priority than the server; leave Ctrl-C to the server, which stops the pool (a terminal sends
    SIGINT to every process of the command, and each worker would print its traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    # Validation is bulk work for whoever sent the largest bodies; the server's event loop and
    # writer serve every tenant, so on a busy machine they come first.
    os.nice(WORKER_NICENESS)
