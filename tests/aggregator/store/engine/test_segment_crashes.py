"""Segments and checkpoints under kill -9 (`segments`, `checkpoints`, `ledger_log`): a process
that applies events, flushes them into files, merges them and checkpoints its keys and its
ledger is killed at a step drawn at random (the k-th file written, fsync, rename, COMMIT,
listing, merge, deletion, checkpoint file or manifest), as a SIGKILL would end it: no cleanup
runs. Reopened (and sent its last acknowledged requests again), the store holds every event
acknowledged before the kill exactly once, its rollups and the balances it reads back agree
with its events, and the folder holds only the files the store lists. A listed file cut short
is detected at open and named."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine.segments import SegmentDamaged, folder_of
from meters.events import Event, to_table
from meters.times import now_us
from tests.aggregator.store.engine.crashing_store import EVENTS, ORG, meter_id
from tests.deadline import seconds_left
from tests.strategies import examples

pytestmark = pytest.mark.processes  # the store is killed mid-write: a child process


def _run_child(path: Path, acked: Path, step: int, batches: int) -> int:
    child = "tests.aggregator.store.engine.crashing_store"
    done = subprocess.run(
        [sys.executable, "-m", child, str(path), str(acked), str(step), str(batches)],
        capture_output=True,
        text=True,
        timeout=seconds_left(),
        check=False,
    )
    assert done.returncode in (0, 137), done.stderr[-3000:]
    return done.returncode


def _check(path: Path, acked: Path) -> None:
    requests = [int(line) for line in acked.read_text().split()]

    async def read() -> tuple[list[tuple[str, int]], list[tuple[str, int, float]], list[Any]]:
        async with Store(path) as store:
            balances = [
                (m, s, usage.partial.events, usage.partial.total)
                for m in (meter_id(0), meter_id(1))
                for s in ("ext:c0", "ext:c1", "ext:c2")
                if (usage := store.live.balances.usage(m, [s])).partial.events
            ]
            events = await store.read(
                lambda con: con.execute(
                    "SELECT external_id, count(*) FROM events WHERE organization_id = ?::UUID"
                    " GROUP BY ALL",
                    [ORG],
                ).fetchall()
            )
            rollups = await store.read(
                lambda con: con.execute(
                    "SELECT meter_id::VARCHAR, sum(events)::BIGINT, sum(total) FROM all_rollups"
                    " GROUP BY ALL ORDER BY ALL"
                ).fetchall()
            )
            return events, rollups, balances

    events, rollups, balances = asyncio.run(read())
    counts = dict(events)
    assert all(n == 1 for n in counts.values()), "an event stored twice"
    for b in requests:
        assert all(counts.get(f"b{b}-{n}") == 1 for n in range(EVENTS)), f"request {b} lost"
    # What the log acknowledged but the child did not record is there too, whole.
    batches = {e.split("-")[0] for e in counts}
    assert all(sum(f"{b}-{n}" in counts for n in range(EVENTS)) == EVENTS for b in batches)
    stored = len(counts)
    sums = sum(int(e.split("-")[1]) for e in counts)
    count, total = meter_id(0), meter_id(1)
    expected = [(count, stored, float(stored)), (total, stored, float(sums))] if stored else []
    assert rollups == expected
    per_customer: dict[str, list[int]] = {}
    for e in counts:
        n = int(e.split("-")[1])
        per_customer.setdefault(f"ext:c{n % 3}", []).append(n)
    assert sorted(balances) == sorted(
        (m, s, len(ns), float(len(ns) if m == count else sum(ns)))
        for s, ns in per_customer.items()
        for m in (count, total)
    )
    listed = {f"{r}-{n:012d}.parquet" for r, n in _listed(path)}
    assert {p.name for p in folder_of(path).iterdir()} == listed


def _listed(path: Path) -> list[tuple[str, int]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT relation, number FROM segments").fetchall()
        return [(str(r), int(n)) for r, n in rows]
    finally:
        con.close()


@settings(max_examples=examples(12), deadline=None)
@given(step=st.integers(1, 160), batches=st.integers(3, 8))
def test_a_kill_at_any_step_loses_and_doubles_nothing(
    tmp_path_factory: pytest.TempPathFactory, step: int, batches: int
) -> None:
    folder = tmp_path_factory.mktemp("crash")
    path, acked = folder / "m.duckdb", folder / "acknowledged"
    _run_child(path, acked, step, batches)
    _check(path, acked)
    # Started again, it goes on from where it was, and is killed no more.
    assert _run_child(path, acked, 10**9, 2) == 0
    _check(path, acked)


def test_a_listed_file_cut_short_is_named_at_open(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"

    async def write() -> None:
        async with Store(path) as store:
            events = [
                Event("use", now_us(), None, "c", f"e{n}", None, None, {}, None) for n in range(5)
            ]
            await store.write(IngestJob(ORG, to_table(events), now_us()))

    asyncio.run(write())
    [damaged] = list(folder_of(path).iterdir())
    with damaged.open("r+b") as file:
        file.truncate(os.path.getsize(damaged) // 2)
    with pytest.raises(SegmentDamaged, match=damaged.name):
        asyncio.run(Store(path).__aenter__())
