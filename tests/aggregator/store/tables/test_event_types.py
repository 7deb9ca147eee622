"""Event types in the store: a data dir of the previous main (schema step 13, no event types
table) lists its event names with their ids, takes a label, and keeps it across a reopen; the
label rule (`meters.event_types.label`)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import duckdb

from aggregator.services import event_type_service
from aggregator.services.event_type_service import EventTypeQuery
from aggregator.store import Store
from aggregator.store.engine.migrations import migrate
from aggregator.store.tables.event_tables import EventQuery
from aggregator.store.tables.event_type_tables import type_id
from meters.event_types import EventTypeUpdate, label

ORG = str(uuid.uuid4())


def _previous_main_data_dir(path: Path) -> None:
    """Step 13, with two user events of one name and a system event."""
    con = duckdb.connect(str(path))
    assert migrate(con, until=13) == 13
    for seq, name, source in (
        (1, "call", "user"),
        (2, "call", "user"),
        (3, "meter.reset", "system"),
    ):
        con.execute(
            "INSERT INTO events (seq, organization_id, name, source, timestamp, ingested_at,"
            " external_customer_id, metadata) VALUES (?, ?, ?, ?, make_timestamptz(?),"
            " make_timestamptz(?), 'c', '{\"region\": \"eu\"}')",
            [seq, ORG, name, source, seq * 1_000_000, 100_000_000 + seq],
        )
    con.execute("CHECKPOINT")
    con.close()


async def _listed(store: Store) -> dict[str, event_type_service.EventType]:
    page = await event_type_service.list_(
        store,
        ORG,
        EventTypeQuery(EventQuery()),
        customer_ids=(),
        external_customer_ids=(),
        page=1,
        limit=100,
    )
    return {t.stats.name: t for t in page.items}


def test_a_previous_data_dir_lists_and_labels_its_event_types(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    _previous_main_data_dir(path)

    async def run() -> None:
        async with Store(path) as store:
            found = await _listed(store)
            call = found["call"]
            assert (call.id, call.stats.occurrences, call.label) == (
                type_id(ORG, "call"),
                2,
                "call",
            )
            assert call.created_at_us == 100_000_001  # its first event's ingestion
            assert found["meter.reset"].id is None
            assert found["meter.reset"].label == "Meter Reset"
            assert call.id is not None
            update = EventTypeUpdate(label="Call", label_property_selector="region")
            await event_type_service.update(store, ORG, call.id, update)
        async with Store(path) as store:
            again = (await _listed(store))["call"]
            assert (again.id, again.label, again.label_property_selector) == (
                call.id,
                "Call",
                "region",
            )
            assert again.created_at_us == 100_000_001 and again.modified_at_us is not None

    asyncio.run(run())


def test_the_label_rule() -> None:
    metadata = {"region": "eu", "zero": 0, "_llm": {"model": "m"}}
    assert label("x", "user", metadata, None) == "x"
    assert label("x", "user", metadata, ("X", None)) == "X"
    for selector in ("region", "metadata.region"):
        assert label("x", "user", metadata, ("X", selector)) == "eu"
    assert label("x", "user", metadata, ("X", "_llm.model")) == "m"
    # A missing or falsy value falls back to the type's label, as Polar does.
    for selector in ("zero", "absent", "region.deeper"):
        assert label("x", "user", metadata, ("X", selector)) == "X"
    assert label("meter.credited", "system", metadata, ("Mine", None)) == "Meter Credited"
    assert label("custom.system", "system", metadata, None) == "custom.system"
