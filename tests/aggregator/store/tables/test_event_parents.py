"""A data dir of the previous main stored each child's parent reference as sent; read now, the
references resolve to event ids (nothing to migrate)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import duckdb

from aggregator.store import Store
from aggregator.store.engine.migrations import migrate
from aggregator.store.tables.event_tables import EventQuery, list_events

ORG = str(uuid.uuid4())


def test_parent_references_stored_by_the_previous_main_resolve(tmp_path: Path) -> None:
    path = tmp_path / "meterline.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, until=13) == 13
    root, by_id = str(uuid.uuid4()), str(uuid.uuid4())
    rows = [
        (root, 1, "root", "r", None),
        (str(uuid.uuid4()), 2, "by-external-id", None, "r"),
        (by_id, 3, "by-id", None, root),
        (str(uuid.uuid4()), 4, "grandchild", None, by_id),
        (str(uuid.uuid4()), 5, "orphan", None, "gone"),
    ]
    for event_id, seq, name, external_id, parent in rows:
        con.execute(
            "INSERT INTO events (id, seq, organization_id, name, timestamp, ingested_at,"
            " external_id, parent_id, metadata) VALUES (?, ?, ?, ?, now(), now(), ?, ?, '{}')",
            [event_id, seq, ORG, name, external_id, parent],
        )
    con.close()

    async def read(query: EventQuery) -> dict[str, str | None]:
        async with Store(path) as store:
            found, _ = await store.read(list_events, ORG, query, limit=100, offset=0)
        return {r.name: r.parent_id for r in found}

    assert asyncio.run(read(EventQuery())) == {
        "root": None,
        "by-external-id": root,
        "by-id": root,
        "grandchild": by_id,
        "orphan": None,
    }
    assert set(asyncio.run(read(EventQuery(depth=1)))) == {"root", "by-external-id", "by-id"}
