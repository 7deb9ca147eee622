"""The single DuckDB writer: jobs from many requests committed together (group commit).

DuckDB is built for bulk work, not many small transactions, and a commit costs an fsync. So
every write goes through one thread that takes all jobs waiting in its queue, runs them in one
transaction and commits once; each caller's future resolves only after that commit (no 2xx
before durability).

The contract for a job: it is a function of a `Tx` (the writer's connection inside the group's
transaction, and the store's in-memory half, both owned by the store and handed over by it:
callers never pass them) that does all of its checks before its first write, and raises an
*expected* error (`REJECTIONS`) only from those checks. A rejected job leaves nothing behind,
so the rest of the group still commits. Any other error rolls the whole group back, and then
every job is retried alone, so one failing job cannot fail others.

A job that fails with a `Repairable` error is repaired (outside any transaction) and run again,
at most a few times: a meter that DuckDB cannot evaluate is marked failed and skipped, so the
events that met it still commit.

No group should hold the writer longer than `job_bound_seconds` (every other tenant's writes
wait for it): groups are cut by weight to what the recent cost per unit of weight says fits in
the bound, and long background work (backfill, plan cycles) comes in chunks sized to it. A
group over the bound is counted (`over_bound`) and logged at most once a minute.

When jobs of more than one tenant have waited within the last `FAIR_WINDOW_SECONDS`, the
tenant that committed the most weight recently goes last: a group is formed from everyone else's
jobs, and it gets one job per group while only its own jobs wait. So a tenant flooding the writer
costs another tenant at most one of its jobs of waiting, not a queue of them (the flooder's peak
rate falls while others write: that is the price of the share). A tenant's own jobs always commit
in the order submitted; jobs without a tenant (background work, the Kafka consumer) are never
held back.

The store's in-memory half takes part in every transaction (`Hooks`): a job stages its effects
on memory, which the writer applies after COMMIT and drops on ROLLBACK. Jobs that apply events
(`waits_for_pending = False`) only stage; every other job runs after the events applied so far
are stored, with the flusher held off (`Hooks.hold`), in a group that no applying job precedes,
so that it sees, and changes, DuckDB's whole truth in seq order.

A `Batchable` job is run together with its neighbours of the same class in one call, so that a
group of many requests costs one set of statements instead of one set per request (statement
overhead, not data volume, dominates small DuckDB writes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import duckdb

from aggregator.errors import AggregatorError, Repairable, StoreClosed
from aggregator.settings import JOB_BOUND_SECONDS
from aggregator.store.base.rows import rollback
from meters.errors import MetersError
from meters.times import NEVER, now_us

if TYPE_CHECKING:
    from aggregator.store.engine.live import Live

T = TypeVar("T")
REJECTIONS: tuple[type[Exception], ...] = (MetersError, AggregatorError)
# (True, result) or (False, rejection) for each job.
Outcome = tuple[bool, Any]


@dataclass(frozen=True, slots=True)
class Tx:
    """What the writer hands every job."""

    con: duckdb.DuckDBPyConnection
    _live: Live | None

    @property
    def live(self) -> Live:
        """The store's in-memory half: a job stages its effects on it (`Live.stage`)."""
        assert self._live is not None, "a writer without the store's memory (its own tests)"
        return self._live


class Batchable(Generic[T]):
    """A job run with its same-class neighbours of a group in one `run_batch` call; its
    outcome's value is a `T`."""

    @classmethod
    def run_batch(cls, tx: Tx, jobs: list[Any]) -> list[Outcome]:
        """Run `jobs` (all of this class), returning one outcome per job, in order. Rejections
        are decided before the first write, as for any job."""
        raise NotImplementedError


Job = Callable[[Tx], T] | Batchable[T]


class Hooks(Protocol):
    """The in-memory half of every transaction (`live.Live`)."""

    def begin(self) -> None: ...
    def prepare(self) -> None:
        """Just before COMMIT (an error rolls the transaction back)."""
        ...

    def commit(self) -> None: ...
    def room(self) -> None:
        """After `commit`, outside `hold` (it may wait for the flusher)."""
        ...

    def rollback(self) -> None: ...
    def repaired(self) -> None:
        """A repair committed outside any job (`Repairable`): what it changed is read anew."""
        ...

    def hold(self) -> AbstractContextManager[object]:
        """Every applied event stored, and kept so, while a transaction of `waits_for_pending`
        jobs runs."""
        ...


def waits_for_pending(job: Job[Any]) -> bool:
    """Whether `job` must see every event applied before it stored (all jobs but those that
    apply events or touch nothing events change say so with `waits_for_pending = False`)."""
    return bool(getattr(job, "waits_for_pending", True))


def independent(job: Callable[[Tx], T]) -> Callable[[Tx], T]:
    """Mark a job that neither reads nor writes what applied events change (customers, tokens,
    forwarding cursors): it need not wait for them to be stored."""
    job.waits_for_pending = False  # type: ignore[attr-defined]
    return job


log = logging.getLogger(__name__)
# Repairs in a row before a job is failed (each repair marks at least one meter failed).
MAX_REPAIRS = 8
# Write conflicts in a row before a job is failed, and the pause before each new attempt.
MAX_CONFLICTS = 20
CONFLICT_PAUSE_SECONDS = 0.05
DEFAULT_JOB_BOUND_SECONDS = JOB_BOUND_SECONDS  # the command line's default
# A group's cost is mostly fixed below this weight (statements, commit): only larger groups
# say what a unit of weight costs, and groups are never cut below it (ingest's throughput).
MIN_CUT_WEIGHT = 10_000
# A tenant counts as present this long after its last job; its recent weight halves over it.
FAIR_WINDOW_SECONDS = 0.5


@dataclass(slots=True)
class _Pending(Generic[T]):
    job: Job[T]
    weight: int
    tenant: str | None
    future: concurrent.futures.Future[T] = field(default_factory=concurrent.futures.Future)


class Writer:
    """Runs write jobs on one connection in one thread, many jobs per transaction."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        *,
        max_group_weight: int = 50_000,
        job_bound_seconds: float = DEFAULT_JOB_BOUND_SECONDS,
        hooks: Live | None = None,
    ) -> None:
        self._con = con
        self._hooks: Hooks | None = hooks
        self._tx = Tx(con, hooks)
        self._max_group_weight = max_group_weight
        self.job_bound_seconds = job_bound_seconds
        self._backlog: list[_Pending[Any]] = []
        # Weight each tenant committed recently (decaying), and when each was last seen waiting.
        self._recent: dict[str | None, float] = {}
        self._seen: dict[str, float] = {}
        self._decayed_at = time.monotonic()
        # Seconds per unit of weight, smoothed: what caps a group's weight to the bound.
        self._seconds_per_weight = 0.0
        self._queue: queue.SimpleQueue[_Pending[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="duckdb-writer", daemon=True)
        self._closed = False
        self._warned_at = NEVER
        self.commits = 0
        self.over_bound = 0
        self.longest_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def run(self, job: Job[T]) -> T:
        """Run `job` in the calling thread, before `start` (at open)."""
        assert not self._thread.is_alive()
        pending: _Pending[T] = _Pending(job, 1, None)
        self._commit_group([pending])
        return pending.future.result()

    def submit(self, job: Job[T], weight: int = 1, tenant: str | None = None) -> asyncio.Future[T]:
        """Queue `job`; the returned future resolves after its transaction commits."""
        if self._closed:
            raise StoreClosed("the store is closed")
        pending: _Pending[T] = _Pending(job, weight, tenant)
        self._queue.put(pending)
        return asyncio.wrap_future(pending.future)

    def close(self) -> None:
        """Finish every queued job, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not (stopping and not self._backlog):
            if not self._backlog:
                first = self._queue.get()
                if first is None:
                    return
                self._backlog.append(first)
            while not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    self._backlog.append(item)
            # A caller that gave up (deadline passed) before its job started gets nothing
            # written; once started, a job commits and its caller's retry is deduplicated.
            group = [p for p in self._next_group() if p.future.set_running_or_notify_cancel()]
            if group:
                started = time.perf_counter()
                self._commit_group(group)
                self._timed(sum(p.weight for p in group), time.perf_counter() - started)
                for p in group:
                    self._recent[p.tenant] = self._recent.get(p.tenant, 0.0) + p.weight

    def _next_group(self) -> list[_Pending[Any]]:
        """Take the next group off the backlog (see the module's note on fairness)."""
        now = time.monotonic()
        decay = 0.5 ** ((now - self._decayed_at) / FAIR_WINDOW_SECONDS)
        self._decayed_at = now
        self._recent = {t: w * decay for t, w in self._recent.items() if w * decay >= 1.0}
        for p in self._backlog:
            if p.tenant is not None:
                self._seen[p.tenant] = now
        self._seen = {t: at for t, at in self._seen.items() if now - at < FAIR_WINDOW_SECONDS}
        limit = self._group_weight_limit()
        candidates = self._backlog
        if len(self._seen) > 1:
            heaviest = max(self._seen, key=lambda t: self._recent.get(t, 0.0))
            others = [p for p in self._backlog if p.tenant != heaviest]
            if others:
                candidates = others
            else:
                limit = 1
        group: list[_Pending[Any]] = []
        weight = 0
        for pending in candidates:
            if group and (weight + pending.weight > limit or self._barrier(pending.job)):
                break
            group.append(pending)
            weight += pending.weight
        taken = {id(p) for p in group}
        self._backlog = [p for p in self._backlog if id(p) not in taken]
        return group

    def _group_weight_limit(self) -> int:
        if self._seconds_per_weight <= 0:
            return self._max_group_weight
        fits = int(self.job_bound_seconds / self._seconds_per_weight)
        return max(min(MIN_CUT_WEIGHT, self._max_group_weight), min(self._max_group_weight, fits))

    def _timed(self, weight: int, seconds: float) -> None:
        self.longest_seconds = max(self.longest_seconds, seconds)
        if weight >= MIN_CUT_WEIGHT:
            per_weight = seconds / weight
            previous = self._seconds_per_weight or per_weight
            self._seconds_per_weight = 0.8 * previous + 0.2 * per_weight
        if seconds > self.job_bound_seconds:
            self.over_bound += 1
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning(
                    "a write group held the writer %.3f s (bound %.3f s, weight %d)",
                    seconds,
                    self.job_bound_seconds,
                    weight,
                )

    def _commit_group(
        self, group: list[_Pending[Any]], repairs: int = 0, conflicts: int = 0
    ) -> None:
        try:
            results = self._run_in_transaction(group)
        except Repairable as exc:
            if repairs < MAX_REPAIRS and exc.repair(self._con, now_us()):
                if self._hooks:
                    self._hooks.repaired()
                self._commit_group(group, repairs + 1, conflicts)
            else:
                self._failed(group, exc)
            return
        except duckdb.TransactionException as exc:
            # A write conflict with a background transaction (rollups being rewritten sorted):
            # the other one has committed or will retry; run again on a fresh snapshot.
            if conflicts < MAX_CONFLICTS:
                time.sleep(CONFLICT_PAUSE_SECONDS)
                self._commit_group(group, repairs, conflicts + 1)
            else:
                self._failed(group, exc)
            return
        except Exception as exc:  # noqa: BLE001 - any failure goes to the callers' futures
            self._failed(group, exc)
            return
        self.commits += 1
        for pending, (ok, value) in zip(group, results, strict=True):
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)

    def _failed(self, group: list[_Pending[Any]], exc: Exception) -> None:
        if len(group) == 1:
            log.error("write job failed", exc_info=exc)
            group[0].future.set_exception(exc)
            return
        log.warning("group of %d write jobs failed; retrying each alone", len(group))
        for pending in group:
            self._commit_group([pending])

    def _barrier(self, job: Job[Any]) -> bool:
        """Whether `job` must start a group of its own, after applied events are stored."""
        return self._hooks is not None and waits_for_pending(job)

    def _run_in_transaction(self, group: list[_Pending[Any]]) -> list[Outcome]:
        hooks = self._hooks
        held = hooks.hold() if hooks and self._barrier(group[0].job) else nullcontext()
        with held:
            results = self._transaction(group)
            if hooks:
                # Inside `hold`: the list of files takes the group's change before a flush,
                # merge or lift can read it.
                try:
                    hooks.commit()
                except Exception:  # committed in DuckDB: the callers have their results
                    log.critical(
                        "applying a committed group's effects in memory failed", exc_info=True
                    )
        if hooks:
            hooks.room()  # outside `hold`: it waits for the flusher
        return results

    def _transaction(self, group: list[_Pending[Any]]) -> list[Outcome]:
        con = self._con
        hooks = self._hooks
        con.execute("BEGIN TRANSACTION")
        if hooks:
            hooks.begin()
        results: list[Outcome] = []
        try:
            i = 0
            while i < len(group):
                job = group[i].job
                if isinstance(job, Batchable):
                    end = i + 1
                    while end < len(group) and type(group[end].job) is type(job):
                        end += 1
                    results.extend(type(job).run_batch(self._tx, [p.job for p in group[i:end]]))
                    i = end
                    continue
                try:
                    results.append((True, job(self._tx)))
                except Repairable:
                    raise  # the whole group is repaired and run again
                except REJECTIONS as exc:
                    results.append((False, exc))
                i += 1
            if hooks:
                hooks.prepare()
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            if hooks:
                hooks.rollback()
            raise
        return results
