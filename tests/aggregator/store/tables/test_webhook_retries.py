"""A failed attempt's retry is scheduled from the attempt's record alone: two replicas that apply
the same record schedule the same retry (a new leader delivers when the old one would have),
and the retries of different deliveries are spread over ±20 % of the wait."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from aggregator.store import Store
from aggregator.store.tables import webhook_tables as sql
from meters.times import now_us
from tests.aggregator.store.tables.test_webhook_redelivery import _answered, _pending_event, _rows

S = 1_000_000


def test_replicas_schedule_the_same_retries_spread_over_the_jitter(tmp_path: Path) -> None:
    t0 = now_us() - 60 * S

    async def made() -> list[tuple[str, str]]:
        async with Store(tmp_path / "a" / "m.duckdb") as store:
            return [await _pending_event(store, t0) for _ in range(20)]

    async def retries(path: Path) -> list[int]:
        async with Store(path) as store:
            dues = await store.read(lambda con: sql.due(con, t0 + S, 100))
            failed = [_answered(due, t0 + S, t0 + 2 * S, 500) for due in dues]
            await store.write(sql.attempted_job(failed, 3600))
            return [(await _rows(store, *pending))[0][2] for pending in rows]

    rows = asyncio.run(made())
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # a replica: the same files
    one, other = (
        asyncio.run(retries(tmp_path / "a" / "m.duckdb")),
        asyncio.run(retries(tmp_path / "b" / "m.duckdb")),
    )
    assert one == other
    waits = [retry - (t0 + 2 * S) for retry in one]
    assert all(4 * S <= wait <= 6 * S for wait in waits)  # 5 s after the attempt, ±20 %
    assert max(waits) - min(waits) > S  # spread, not all at one time
