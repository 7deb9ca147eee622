"""A redelivery asked while an attempt of the same outbox row is under way (sent, its answer
not yet recorded) is kept: the attempt's record does not end the row, which is due again at
the time asked. One asked before the attempt began is that attempt: the row ends with it.
Either way an attempt is counted once, a failed one too (whose retry moves `next_at`)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from aggregator.store import Store
from aggregator.store.tables import webhook_tables as sql
from meters.times import now_us
from tests.aggregator.store.tables.test_webhook_retention import ORG, new_endpoint

S = 1_000_000


async def _pending_event(store: Store, at_us: int) -> tuple[str, str]:
    """An event with a pending outbox row due at `at_us` for a new endpoint: (event, endpoint)."""
    endpoint = await new_endpoint(store, at_us)
    event_id = str(uuid.uuid4())

    def job(tx: sql.Tx) -> None:
        tx.con.execute(
            "INSERT INTO webhook_events VALUES (?::UUID, ?::UUID, 'meter.alert', '{}',"
            " make_timestamptz(?))",
            [event_id, ORG, at_us],
        )
        tx.con.execute(
            "INSERT INTO webhook_outbox VALUES (?::UUID, ?::UUID, 0, make_timestamptz(?),"
            " 'pending', NULL)",
            [event_id, endpoint.id, at_us],
        )

    await store.write(job)
    return event_id, endpoint.id


async def _rows(store: Store, event_id: str, endpoint_id: str) -> list[tuple[str, int, int]]:
    """The event's outbox rows for the endpoint: (state, attempts, next_at in µs)."""
    found = await store.read(
        lambda con: con.execute(
            "SELECT state, attempts, epoch_us(next_at) FROM webhook_outbox"
            " WHERE event_id = ?::UUID AND endpoint_id = ?::UUID",
            [event_id, endpoint_id],
        ).fetchall()
    )
    return [(str(s), int(a), int(n)) for s, a, n in found]


def _answered(due: sql.Due, started_us: int, ended_us: int, code: int = 200) -> sql.Attempt:
    ok = code == 200
    return sql.Attempt(due, ended_us, ok, code, "ok", (ended_us - started_us) / 1000)


def test_a_redelivery_asked_during_an_attempt_is_sent_again(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            t0 = now_us() - 60 * S
            event_id, endpoint = await _pending_event(store, t0)
            [due] = await store.read(lambda con: sql.due(con, t0 + S, 10))
            # The attempt starts at t0 + 1 s; the receiver has it, and its user asks for a
            # redelivery at t0 + 2 s, before the attempt's answer is recorded at t0 + 3 s.
            await store.write(sql.redeliver_job(ORG, event_id, t0 + 2 * S))
            await store.write(sql.attempted_job([_answered(due, t0 + S, t0 + 3 * S)], 3600))
            assert await _rows(store, event_id, endpoint) == [("pending", 1, t0 + 2 * S)]
            [again] = await store.read(lambda con: sql.due(con, t0 + 4 * S, 10))
            assert (again.event_id, again.attempts) == (event_id, 1)
            await store.write(sql.attempted_job([_answered(again, t0 + 4 * S, t0 + 5 * S)], 3600))
            assert [r[:2] for r in await _rows(store, event_id, endpoint)] == [("delivered", 2)]

    asyncio.run(run())


def test_a_redelivery_asked_before_an_attempt_began_is_that_attempt(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            t0 = now_us() - 60 * S
            event_id, endpoint = await _pending_event(store, t0)
            await store.write(sql.redeliver_job(ORG, event_id, t0 + S // 2))
            [due] = await store.read(lambda con: sql.due(con, t0 + S, 10))
            await store.write(sql.attempted_job([_answered(due, t0 + S, t0 + 2 * S)], 3600))
            assert [r[:2] for r in await _rows(store, event_id, endpoint)] == [("delivered", 1)]
            assert await store.read(lambda con: sql.due(con, t0 + 3 * S, 10)) == []

    asyncio.run(run())


def test_a_failed_attempt_is_counted_once_and_retried_or_redelivered(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            t0 = now_us() - 60 * S
            retried, one = await _pending_event(store, t0)
            redelivered, other = await _pending_event(store, t0)
            dues = {d.event_id: d for d in await store.read(lambda con: sql.due(con, t0 + S, 10))}
            await store.write(sql.redeliver_job(ORG, redelivered, t0 + 2 * S))
            failed = [_answered(dues[e], t0 + S, t0 + 3 * S, 500) for e in (retried, redelivered)]
            await store.write(sql.attempted_job(failed, 3600))
            [(state, attempts, retry_us)] = await _rows(store, retried, one)
            assert (state, attempts) == ("pending", 1)
            assert t0 + 7 * S <= retry_us <= t0 + 9 * S  # 5 s after the attempt, ±20%
            assert await _rows(store, redelivered, other) == [("pending", 1, t0 + 2 * S)]

    asyncio.run(run())
