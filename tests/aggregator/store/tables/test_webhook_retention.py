"""The webhook outbox's retention: delivered events and delivery logs older than the retention
are pruned; what is still pending, and anything newer, stays."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from aggregator.store import Store
from aggregator.store.tables import webhook_endpoints as endpoints
from aggregator.store.tables import webhook_tables as sql
from meters.times import now_us
from meters.webhook_rules import EndpointCreate, new_secret

ORG = str(uuid.uuid4())
DAY_US = 86_400 * 1_000_000


async def new_endpoint(store: Store, at_us: int) -> endpoints.EndpointRow:
    """A new endpoint of `ORG` taking `meter.alert`, made at `at_us`."""
    return await store.write(
        endpoints.create_endpoint_job(
            ORG,
            EndpointCreate(url="https://example.com/h", format="raw", events=["meter.alert"]),
            at_us,
            endpoint_id=str(uuid.uuid4()),
            secret=new_secret(),
        )
    )


def test_prune_keeps_pending_and_recent(tmp_path: Path) -> None:
    async def run() -> tuple[int, list[tuple[str, str]], int]:
        async with Store(tmp_path / "m.duckdb") as store:
            endpoint = await new_endpoint(store, now_us())
            now = now_us()
            old = now - 40 * DAY_US
            # Three events 40 days old: delivered, given up, still pending; one delivered today.
            for name, at, state in (
                ("delivered", old, "delivered"),
                ("failed", old, "failed"),
                ("pending", old, "pending"),
                ("recent", now, "delivered"),
            ):
                await store.write(_event(name, endpoint.id, at, state))
            pruned = await store.write(sql.prune_job(now - 30 * DAY_US))
            left = await store.read(
                lambda con: con.execute(
                    "SELECT e.payload, o.state FROM webhook_events e JOIN webhook_outbox o"
                    " ON o.event_id = e.id ORDER BY e.payload"
                ).fetchall()
            )
            logs = await store.read(
                lambda con: con.execute("SELECT count(*) FROM webhook_deliveries").fetchall()
            )
            return pruned, left, int(logs[0][0])

    pruned, left, logs = asyncio.run(run())
    assert pruned == 3  # the 40-day-old attempts
    assert left == [("pending", "pending"), ("recent", "delivered")]
    assert logs == 1


def _event(name: str, endpoint_id: str, at_us: int, state: str) -> sql.Job[None]:
    def job(tx: sql.Tx) -> None:
        event_id = str(uuid.uuid4())
        tx.con.execute(
            "INSERT INTO webhook_events VALUES (?::UUID, ?::UUID, 'meter.alert', ?,"
            " make_timestamptz(?))",
            [event_id, ORG, name, at_us],
        )
        ended = None if state == "pending" else at_us
        tx.con.execute(
            "INSERT INTO webhook_outbox VALUES (?::UUID, ?::UUID, 1, make_timestamptz(?), ?,"
            " make_timestamptz(?))",
            [event_id, endpoint_id, at_us, state, ended],
        )
        tx.con.execute(
            "INSERT INTO webhook_deliveries VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, 1,"
            " make_timestamptz(?), ?, 200, 'ok', 1.0)",
            [str(uuid.uuid4()), ORG, event_id, endpoint_id, at_us, state == "delivered"],
        )

    return job
