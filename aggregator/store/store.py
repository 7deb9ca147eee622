"""The store: one DuckDB file, a writer thread, a flusher thread, a merger thread, a few reader
threads, the state it keeps in memory (`live`), and beside the file the ingest log, the
segments (the events and their rollups, as Parquet files: `segments`) and the stored keys that
do not fit in memory (`dedupe`).

The store is the only place with DuckDB SQL (tokens are kept apart, in SQLite: `auth`).
Writes are jobs run by `Writer` (group commit); events are applied in memory at once and stored
by the `Flusher` in large transactions (`memtable`); embedded requests are durable before that
in the `ingest_log`; segments are merged by the `Merger`.
Reads run on per-thread cursors off the event loop, each interrupted past `read_timeout_seconds`
(one tenant's heavy query must not hold a reader thread that every tenant shares); `read` first
waits until every event applied so far is stored, `read_now` does not (for tables ingest does
not defer), and balances and applied Kafka offsets are read from memory (`live`). (Whatever
reads both the memtable and DuckDB reads the memtable first: a batch the flusher releases in
between was committed before, so a fresh statement sees it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import duckdb
import pyarrow as pa

from aggregator.errors import QueryTimeout, StorageFull, UsageError
from aggregator.settings import DIMENSION_VALUES
from aggregator.store.apply.batch import Meters
from aggregator.store.apply.commands import applied_group, applied_job, positioned
from aggregator.store.apply.ingest import Replay
from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.base.rows import transaction
from aggregator.store.engine import checkpoints, dedupe, disk, ingest_log, ledger_log
from aggregator.store.engine.balances import Balances
from aggregator.store.engine.disk import DiskHealth
from aggregator.store.engine.flusher import Flusher
from aggregator.store.engine.gates import Gates
from aggregator.store.engine.ingest_log import IngestLog
from aggregator.store.engine.ingest_log_repair import log_directory
from aggregator.store.engine.live import Live, SequenceCounter
from aggregator.store.engine.memtable import ROW_GROUP, Memtable, Positions
from aggregator.store.engine.merger import Merger
from aggregator.store.engine.migrations import migrate
from aggregator.store.engine.segments import (
    FANOUT,
    LIFTED,
    Segment,
    Segments,
    SegmentsChanged,
)
from aggregator.store.engine.segments import folder_of as segments_folder
from aggregator.store.engine.writer import (
    DEFAULT_JOB_BOUND_SECONDS,
    REJECTIONS,
    Job,
    Outcome,
    Writer,
)
from aggregator.store.listeners import Listeners
from aggregator.store.metering import groups, rollups
from aggregator.store.metering.evaluation import EVALUATION_ERRORS
from aggregator.store.metering.rollups import Prepared
from aggregator.store.tables import dimensions
from aggregator.store.tables.alert_tables import Alerts, Payload, basic_payload
from aggregator.store.tables.hold_tables import HoldKeys
from aggregator.store.tables.ledger_tables import Ledgers, kept_elsewhere
from aggregator.store.tables.pricing_settings import PricingBook
from aggregator.store.tables.topup_tables import TopUps
from aggregator.store.tables.webhook_tables import StateSubscribers
from meters.commands import Command
from meters.pricing import Pricing
from meters.times import now_us

T = TypeVar("T")
# Organizations with more meters than this have their events evaluated before the writer takes
# them (`Store.prepare`). Measured on 2 cores: 200 meters cost a 100-event request 35 ms of
# evaluation, 10 meters 5 ms, most of it planning the statement, which the group commit pays
# once for all of an organization's requests in the group; evaluating each request of a
# 10-meter organization apart cost embedded ingest about a fifth of its throughput.
PREPARED_METERS = 20
# Tries of `lift` per relation before it leaves the rows where they are (a merge took its
# files each time).
_LIFT_ATTEMPTS = 5

log = logging.getLogger(__name__)


class CommandLog(Protocol):
    """Where write records go when they are not applied in this process at once (Kafka mode:
    the control topic, which this core reads and applies); answers once applied."""

    async def append(self, command: Command) -> Outcome: ...


class Store:
    """Owns the DuckDB file. Use as an async context manager; closing drains pending writes."""

    def __init__(
        self,
        path: Path | str,
        *,
        readers: int = 4,
        evaluators: int = 2,
        prepared_meters: int = PREPARED_METERS,
        memory_limit: str | None = None,
        checkpoint_bytes: int = 16 * 1024 * 1024,
        read_timeout_seconds: float = 30.0,
        job_bound_seconds: float = DEFAULT_JOB_BOUND_SECONDS,
        flush_events: int = ROW_GROUP,
        flush_seconds: float = 5.0,
        max_pending_events: int = 4 * ROW_GROUP,
        merge_check_seconds: float = 0.5,
        merge_fanout: int = FANOUT,
        dedupe_memory_keys: int = dedupe.MEMORY_KEYS,
        alert_payload: Payload = basic_payload,
        commands: CommandLog | None = None,
        holds_customer: Callable[[str, str], bool] | None = None,
        dimension_values: int = DIMENSION_VALUES,
        checkpoint_seconds: float = 10.0,
        checkpoint_keys: int = 300_000,
    ):
        self.path = str(path)
        # Values of one dimension a meter's groups keep per customer reference and bucket; the
        # rest count under `__other__` (decision 19). What is stored: every core of a cluster
        # runs with the same.
        self.bound = groups.Bound(dimension_values)
        self.disk = DiskHealth(Path(self.path).parent)
        # How a `meter.alert` webhook event's data is made (the composition gives the API's
        # shapes), needed from the start: replaying the ingest log can fire alerts.
        self._alert_payload = alert_payload
        # (organization id, routing key): whether this core holds a customer, whose ledger it
        # then keeps (`ledger_tables.Ledgers`; a shard of several); None: every customer.
        self._holds_customer = holds_customer
        # The flusher checkpoints once the WAL holds this much, between its own transactions:
        # a checkpoint holds every commit while it runs, so none should fall on the ingest path.
        self._checkpoint_bytes = checkpoint_bytes
        self._flush_events = flush_events
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending_events
        self._merge_check_seconds = merge_check_seconds
        # How often the hot state is written for a start to read back (`checkpoints`).
        self._checkpoint_seconds = checkpoint_seconds
        self._checkpoint_keys = checkpoint_keys  # or once this many dedupe keys were added
        self._merge_fanout = merge_fanout
        self._dedupe_memory_keys = dedupe_memory_keys
        self._readers = readers
        self._read_timeout = read_timeout_seconds
        self._job_bound = job_bound_seconds
        self._memory_limit = memory_limit
        self._con: duckdb.DuckDBPyConnection | None = None
        self._writer: Writer | None = None
        self._flusher: Flusher | None = None
        self._merger: Merger | None = None
        self._checkpoints: checkpoints.Checkpoints | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._log = IngestLog(None)
        self._pool: ThreadPoolExecutor | None = None
        self._behind: ThreadPoolExecutor | None = None
        self._evaluator_threads = evaluators
        self._prepared_meters = max(0, prepared_meters)
        self._evaluators: ThreadPoolExecutor | None = None
        self._gates = Gates()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        # Snapshots being copied (`snapshot`): interrupted and waited for by `close`.
        self._copying: dict[duckdb.DuckDBPyConnection, threading.Event] = {}
        self._interrupting: set[asyncio.Task[None]] = set()
        self._live: Live | None = None
        # Told what each commit changed, and that webhooks are due (`Listeners`).
        self.listeners = Listeners()
        self._commands = commands

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def open(self) -> None:
        if self._con is not None:
            raise RuntimeError("store already open")
        config: dict[str, str | bool | int | float | list[str]] = {
            # DuckDB's own checkpoints would fall on whichever commit crossed the threshold;
            # the flusher runs them instead (`checkpoint_bytes`). This is a backstop only.
            "checkpoint_threshold": "4GB"
        }
        if self._memory_limit:
            config["memory_limit"] = self._memory_limit
        wal = spill = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            wal = Path(self.path + ".wal")
            spill = dedupe.Spill(Path(self.path + ".dedupe"), self._dedupe_memory_keys)
        self._con = duckdb.connect(self.path, config=config)
        # Set after connecting: the (built-in) ICU extension loads on first use.
        self._con.execute("SET GLOBAL TimeZone = 'UTC'")
        # Each query over the segments reads their files' footers once, not every time.
        self._con.execute("SET GLOBAL parquet_metadata_cache = true")
        migrate(self._con)
        if self.path == ":memory:":
            self._scratch = tempfile.TemporaryDirectory(prefix="meterline-segments-")
            folder = Path(self._scratch.name)
        else:
            folder = segments_folder(Path(self.path))
        segments = Segments(folder, fanout=self._merge_fanout)
        try:
            segments.open(self._con)
            segments.move_base_rows(self._con)  # once, for a data dir of an earlier version
        except BaseException:
            self._con.close()
            self._con = None
            raise
        self._refuse_other_ledgers()
        dimensions.derive_pending(self._con, segments, self.bound)
        log = self._log = IngestLog(None if wal is None else log_directory(Path(self.path)))
        # What the ingest log holds after the last stored request was acknowledged but not
        # stored: applied again below, before any other job. A log that cannot give it all
        # back is refused (`ingest_log.LogCorrupt`), and the store with it.
        stored, witnessed = ingest_log.stored_marks(self._con)
        try:
            logged = log.open(stored, witnessed)
        except BaseException:
            self._con.close()
            self._con = None
            raise
        if log.witnessed and not witnessed:
            ingest_log.mark_witnessed(self._con)
        table, balances = Memtable(), Balances()
        self._flusher = Flusher(
            self._con.cursor(),
            table,
            log,
            segments,
            wal=wal,
            flush_events=self._flush_events,
            flush_seconds=self._flush_seconds,
            ledger=ledger_log.Checkpoint(
                balances, segments, every_seconds=self._checkpoint_seconds
            ),
            checkpoint_bytes=self._checkpoint_bytes,
            idle=self._compact_memory,
            disk=self.disk,
            bound=self.bound,
        )
        holds, pricing = HoldKeys(), PricingBook()
        live = self._live = Live(
            SequenceCounter.load(self._con, logged),
            self._flusher,
            table,
            log,
            self._con.cursor(),
            segments,
            balances,
            notices=self.listeners,
            features=(
                Meters(),
                holds,
                Alerts(self._alert_payload),
                TopUps(),
                StateSubscribers(),
                Ledgers(self._holds_customer),
                pricing,
            ),
            max_pending_events=self._max_pending,
            spill=spill,
            bound=self.bound,
        )
        found = None
        if self.path != ":memory:":
            folder = checkpoints.folder(Path(self.path))
            found = checkpoints.newest(folder, self._con, spill.keys if spill else None)
            self._checkpoints = checkpoints.Checkpoints(
                folder,
                self._con.cursor(),
                live.dedupe,
                self._flusher.exclusive,
                every_seconds=self._checkpoint_seconds,
                every_keys=self._checkpoint_keys,
                found=found,
            )
        live.load(self._con, found)
        holds.load(self._con, now_us())
        pricing.load(self._con)
        self._flusher.start()
        if self._checkpoints is not None:
            self._checkpoints.start()
        self._merger = Merger(
            self._con.cursor(),
            segments,
            self._flusher.exclusive,
            check_seconds=self._merge_check_seconds,
        )
        self._merger.start()
        self._writer = Writer(self._con.cursor(), job_bound_seconds=self._job_bound, hooks=live)
        for request in logged:
            self._writer.run(Replay(request))
        self._writer.start()
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="duckdb-reader")
        self._behind = ThreadPoolExecutor(
            1, thread_name_prefix="duckdb-behind", initializer=_lowest_priority
        )
        self._evaluators = ThreadPoolExecutor(
            self._evaluator_threads, thread_name_prefix="duckdb-evaluator"
        )

    def _refuse_other_ledgers(self) -> None:
        """A shard's data dir from before each customer's ledger was its shard's alone holds
        other shards' customers' credits and holds too: refused, not served (its lists would
        show them twice across shards, and its webhooks fire for them)."""
        assert self._con is not None
        if self._holds_customer is None:
            return
        others = kept_elsewhere(self._con, self._holds_customer)
        if others:
            self._con.close()
            self._con = None
            raise UsageError(
                f"this data dir keeps the credits or holds of {others} customers another shard"
                " holds (written by a version where every shard kept every customer's ledger):"
                " start this shard on a new data dir, which applies the topics from their"
                " start (docs: replicas and shards)"
            )

    def close(self) -> None:
        if self._con is None:
            return
        assert self._writer is not None and self._pool is not None and self._flusher is not None
        assert self._merger is not None
        self._writer.close()
        self._merger.close()
        self._flusher.close()
        if self._checkpoints is not None:
            try:
                self._checkpoints.close()  # a start reads it back: every key, stored
            except Exception:  # the next start rebuilds the keys from the events instead
                log.exception("the checkpoint at stop failed")
            self._checkpoints = None
        self._log.close()
        self.live.close()
        self._pool.shutdown(wait=True)
        if self._behind is not None:
            self._behind.shutdown(wait=True)
        if self._evaluators is not None:
            self._evaluators.shutdown(wait=True)
        for cursor in self._cursors:
            cursor.close()
        for copying, done in list(self._copying.items()):
            copying.interrupt()
            done.wait(30)
        # No read is left that could open a retired file (a start would delete them anyway).
        self.live.segments.delete_retired(now=math.inf)
        self._con.close()
        self._con = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def _compact_memory(self) -> None:
        """The flusher's idle work: merge the runs of the sets held in memory."""
        if self._live is not None:
            self._live.compact()

    def pricing_of(self, organization_id: str) -> Pricing | None:
        """The organization's pricing settings as ingest applies them (held in memory)."""
        return self.live.feature(PricingBook).of(organization_id)

    @property
    def live(self) -> Live:
        assert self._live is not None, "store is not open"
        return self._live

    @property
    def writer(self) -> Writer:
        assert self._writer is not None, "store is not open"
        return self._writer

    @property
    def merger(self) -> Merger:
        assert self._merger is not None, "store is not open"
        return self._merger

    async def write(self, job: Job[T], weight: int = 1, tenant: str | None = None) -> T:
        """Run `job` in a group commit (`tenant`'s share of the writer); returns after the
        commit."""
        return await self._committed(self.writer.submit(job, weight, tenant))

    def queued(self, job: Job[T], weight: int = 1) -> Awaitable[T]:
        """`write`, but `job` is in the writer's queue when this returns, behind every job
        queued before it and in no tenant's share: the journal's order is the writer's."""
        return self._committed(self.writer.submit(job, weight, None))

    def queued_at(self, job: Job[T], positions: Positions) -> Awaitable[T]:
        """`queued`, with the journal `positions` of its group stored as a group's are."""
        return self.queued(positioned(job, positions))

    def queued_commands(
        self, commands: Sequence[Command], after: Sequence[Job[Any]], positions: Positions
    ) -> Awaitable[list[Outcome]]:
        """A journal group of write records (`applied_group`), queued as `queued` does; each
        record's outcome, in order. A record no job can be made of is refused, nothing
        stored."""
        outcomes: list[Outcome | None] = []
        jobs: list[Job[Outcome]] = []
        for command in commands:
            try:
                jobs.append(applied_job(command))
                outcomes.append(None)
            except REJECTIONS as exc:
                outcomes.append((False, exc))
        group = self.queued(applied_group(jobs, after, positions), max(1, len(jobs)))

        async def answered() -> list[Outcome]:
            applied = iter(await group)
            done = [outcome or next(applied) for outcome in outcomes]
            for command, outcome in zip(commands, done, strict=True):
                self.listeners.applied(command, outcome)
            return done

        return answered()

    async def _committed(self, submitted: Awaitable[T]) -> T:
        try:
            result = await submitted
        except REJECTIONS:
            raise
        except Exception as exc:
            if disk.fatal(exc):
                self.disk.lost(exc)
            if not disk.full(exc):
                raise
            self.disk.failed(exc)
            raise StorageFull(str(exc).splitlines()[0]) from exc
        self.disk.succeeded()
        return result

    async def submit(self, command: Command) -> Any:
        """Apply a write record (`apply.commands`) here, or through the log the store was
        given, which applies it the same way; the write's result, or its rejection raised."""
        if self._commands is None:
            ok, value = await self.apply(command)
        else:
            ok, value = await self._commands.append(command)
        if not ok:
            raise value
        return value

    async def apply(self, command: Command) -> Outcome:
        """Apply a write record once per request id: its outcome (the stored one, if applied
        before)."""
        try:
            job = applied_job(command)
        except REJECTIONS as exc:  # a record no job can be made of: refused, nothing stored
            return False, exc
        outcome = await self.write(job, tenant=command.organization_id)
        self.listeners.applied(command, outcome)
        return outcome

    async def stored(self) -> None:
        """Returns once every event applied so far is stored, by the flusher: a job that holds
        it off (`Live.hold`) then stores little itself, on the writer's time."""
        assert self._flusher is not None, "store is not open"
        await self._flusher.barrier()

    async def checkpoint_ledger(self) -> None:
        """Take the ledger's checkpoint now (`ledger_log`), if anything was written since the
        last: what the flusher does every `checkpoint_seconds`."""
        assert self._flusher is not None, "store is not open"
        await asyncio.to_thread(self._flusher.checkpoint_ledger)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(cursor, *args, **kwargs)` on a reader thread once every event applied so
        far is stored; QueryTimeout past the read timeout (the query is interrupted, and one
        still waiting for a thread never starts)."""
        assert self._flusher is not None, "store is not open"
        try:
            async with asyncio.timeout(self._read_timeout):
                await asyncio.shield(self._flusher.barrier())
        except TimeoutError:
            raise QueryTimeout(self._read_timeout) from None
        return await self.read_now(fn, *args, **kwargs)

    async def snapshot(
        self, target: Path, earlier: Path | None = None
    ) -> dict[str, dict[int, int]]:
        """A consistent copy of the database in the new file `target` (and of its segments,
        beside it), taken while writes go on: once every event applied so far is stored, one
        read transaction copies every table and the files it lists, on a cursor and thread of
        its own (a copy may outlast the read timeout; closing the
        store interrupts it). `earlier`: a copy made before on the disk of `target`, whose
        segments are linked rather than copied again. What it covers: the stored positions,
        per topic and partition."""
        assert self._flusher is not None and self._con is not None, "store is not open"
        await self._flusher.barrier()
        con = self._con
        segments = self.live.segments
        quoted = str(target).replace("'", "''")

        def copy() -> dict[str, dict[int, int]]:
            cursor, done = con.cursor(), threading.Event()
            self._copying[cursor] = done
            try:
                name = cursor.execute("SELECT current_database()").fetchall()[0][0]
                cursor.execute("BEGIN TRANSACTION")
                cursor.execute(f"ATTACH '{quoted}' AS meterline_snapshot")
                cursor.execute(f'COPY FROM DATABASE "{name}" TO meterline_snapshot')
                # The files the copied `segments` lists, linked (or copied) beside it in the
                # same transaction's view of the list: a file retired since is still there
                # for the grace every read gets.
                before = segments_folder(earlier) if earlier is not None else None
                segments.copy(segments.listed(cursor), segments_folder(target), before)
                # One taken after the copy began may cover seqs it lacks: a start on the copy
                # passes it over (`checkpoints.newest`) and reads the keys from the events.
                checkpoints.copy_newest(
                    checkpoints.folder(Path(self.path)),
                    checkpoints.folder(target),
                    None if earlier is None else checkpoints.folder(earlier),
                )
                covered: dict[str, dict[int, int]] = {}
                for topic, partition, offset in cursor.execute(
                    "SELECT topic, partition, next_offset FROM kafka_offsets"
                ).fetchall():
                    covered.setdefault(topic, {})[int(partition)] = int(offset)
                cursor.execute("COMMIT")
                return covered
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
                raise
            finally:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("DETACH DATABASE IF EXISTS meterline_snapshot")
                cursor.close()
                del self._copying[cursor]
                done.set()

        return await asyncio.to_thread(copy)

    async def lift(self, relations: Sequence[str], where: str, params: list[object]) -> bool:
        """Move the rows of `relations` (kept as segments) that `where` matches out of their
        files into files of their own (of level `LIFTED`, merged with no other kind), which a
        job's steps rewrite without writing the large ones again (`void_jobs`: a customer's
        rollups). The files are written again without them, and theirs, off every lock, on a
        cursor of their own and the background thread (`read_behind`), and listed in place of
        the files they come from in one transaction under the store's exclusive lock (a
        merge's way), if those are all still listed; else tried again. What a reader sees is
        the same before and after. Whether every row is where it was asked to be (a merge took
        the files each time: not)."""
        assert self._flusher is not None and self._con is not None, "store is not open"
        segments, exclusive, con = self.live.segments, self._flusher.exclusive, self._con

        def move(relation: str) -> int | None:
            cursor = con.cursor()
            try:
                change, rows = segments.extract(cursor, relation, where, params)
                if not change or rows is None:
                    return 0
                listed = False
                try:
                    change.added.append(segments.write(relation, rows, LIFTED))
                    with exclusive:
                        if not segments.still_live(change.retired):
                            return None  # merged or rewritten meanwhile
                        try:
                            with transaction(cursor):
                                segments.commit(cursor, change)
                        except SegmentsChanged:
                            return None  # the list in memory was behind the database's
                        listed = True
                        segments.committed(change)
                finally:
                    if not listed:
                        segments.abandon(change)
                return int(rows.num_rows)
            finally:
                cursor.close()

        for relation in relations:
            for _ in range(_LIFT_ATTEMPTS):
                if await self._run_behind(move, relation) is not None:
                    break
            else:
                return False
        return True

    async def read_behind(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(cursor, *args, **kwargs)` for background work that may read much (a void job's
        steps), on a thread of its own at the lowest CPU priority (Linux's `nice` 19 for that
        thread): what it costs the machine comes out of what every other thread leaves, not out
        of ingest's. Not waiting for applied events to be stored, nor bounded by the read
        timeout: such work is bounded by its own sizes."""

        def run() -> T:
            return fn(self._cursor(), *args, **kwargs)

        return await self._run_behind(run)

    async def write_segment(self, relation: str, table: pa.Table) -> Segment:
        """`table` written as a file of `relation` (`Segments.write`: durable, listed by
        nothing), in the background (`read_behind`'s thread), for a job to list
        (`Live.change_segments`) or to delete (`Segments.abandon`); one neither listed nor
        deleted is deleted when the store opens next."""
        segments = self.live.segments
        return await self._run_behind(segments.write, relation, table)

    async def _run_behind(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._behind is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(self._behind, fn, *args)

    async def read_now(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`read` without waiting for applied events to be stored: for what ingest never
        defers (customers, meters, plans, offset resets) or may lag (forwarding)."""
        assert self._pool is not None, "store is not open"
        read = _Read()

        def run() -> T:
            try:
                if read.given_up.is_set():
                    raise QueryTimeout(self._read_timeout)
                cursor = self._cursor()
                read.cursor = cursor
                return fn(cursor, *args, **kwargs)
            finally:
                with read.lock:  # from here the cursor may run another read: not interrupted
                    read.ended = True

        future = asyncio.get_running_loop().run_in_executor(self._pool, run)
        try:
            # Not `wait_for`: on 3.11 it returns an answer that meets a cancellation, and the
            # cancelled task would run on.
            async with asyncio.timeout(self._read_timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            read.given_up.set()
            # Retrieved, so that its (interrupted) outcome is not reported as never retrieved.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            interrupting = asyncio.create_task(read.interrupt())
            self._interrupting.add(interrupting)
            interrupting.add_done_callback(self._interrupting.discard)
            raise QueryTimeout(self._read_timeout) from None

    async def prepare(self, organization_id: str, events: pa.Table) -> Prepared | None:
        """The organization's events among `events` (with their origin:
        `ingest_log.with_origin`) evaluated for its meters on an evaluator thread, before the
        writer takes them (`IngestJob`'s and `ConsumedBatch`'s `prepared`): what an
        organization's meters cost is then not paid inside the group commit that every
        organization waits for. One request of an organization at a time,
        so that one with many meters keeps at most one evaluator busy. None when it has at
        most `prepared_meters` meters (evaluated in the group commit, one statement for all its
        requests of the group, they cost the others less than a statement per request costs the
        machine), or when they cannot be evaluated here (the writer evaluates them then, and
        marks a meter that fails)."""
        known = self.live.feature(Meters).known(organization_id)
        if known is not None and len(known) <= self._prepared_meters:
            return None
        assert self._evaluators is not None, "store is not open"
        loop = asyncio.get_running_loop()
        release = await self._gates.acquire(organization_id)
        try:
            future = loop.run_in_executor(self._evaluators, self._prepare, organization_id, events)
        except BaseException:
            release()
            raise
        # The organization's next request waits for this evaluation to end, even when this
        # one's caller gives up first.
        future.add_done_callback(lambda _: release())
        return await future

    def _prepare(self, organization_id: str, events: pa.Table) -> Prepared | None:
        cursor = self._cursor()
        meters: Sequence[MeterRow] | None = self.live.feature(Meters).known(organization_id)
        if meters is None:
            meters = meters_of(cursor, [organization_id])
        if len(meters) <= self._prepared_meters:
            return None
        try:
            return rollups.prepare(cursor, meters, events)
        except EVALUATION_ERRORS:
            return None

    def applied_offsets(self, topic: str) -> dict[int, int]:
        """The next offset of each partition of `topic` as applied so far (stored or not)."""
        return self.live.applied_offsets(topic)

    def committed_offsets(self, topic: str) -> dict[int, int]:
        """The next offset of each partition of `topic` whose events are applied and committed
        (stored or not): what a request waiting for events (`api.read_after`) reads."""
        return self.live.committed_offsets(topic)

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cursor is None:
            assert self._con is not None
            cursor = self._con.cursor()
            self._cursors.append(cursor)
            self._local.cursor = cursor
        return cursor


def _lowest_priority() -> None:
    """This thread at the lowest CPU priority (where the OS lets a thread have its own)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class _Read:
    """A read given up on (`read_now`) is interrupted until it ends: an interrupt that lands
    before its query starts is lost (one such ran a query past the timeout for ever)."""

    def __init__(self) -> None:
        self.given_up = threading.Event()
        self.lock = threading.Lock()
        self.cursor: duckdb.DuckDBPyConnection | None = None
        self.ended = False

    async def interrupt(self) -> None:
        while True:
            with self.lock:
                if self.ended:
                    return
                if self.cursor is not None:
                    self.cursor.interrupt()
            await asyncio.sleep(0.05)
