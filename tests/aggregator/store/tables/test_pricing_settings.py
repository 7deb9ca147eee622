"""An organization's pricing settings in the store: the `pricing.settings` record applied once
per request id, read back, in memory for ingest (`Store.pricing_of`) from commit and across a
reopen; a data dir of the previous main (schema step 35) takes them; a new shard keeps them;
the digest counts them only where they are set."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import duckdb
import pytest

from aggregator.errors import KeyReused
from aggregator.store import Store, logical_rows
from aggregator.store.engine.migrations import migrate
from aggregator.store.engine.segments import Segments, folder_of
from aggregator.store.tables.pricing_settings import settings_of
from aggregator.store.tables.shard_retention import retain
from meters.commands import command
from meters.pricing import PricingSettingsUpdate
from tests.aggregator.store.schema_before import before_pricing

ORG = str(uuid.uuid4())
OTHER = str(uuid.uuid4())
FIRST = PricingSettingsUpdate.model_validate(
    {"catalog": True, "markup_percent": "12.5", "overrides": {"a/b": {"input": 1, "output": 2}}}
).document()
SECOND = PricingSettingsUpdate.model_validate({"catalog": False}).document()


def _record(request_id: str, at: int, data: dict[str, object]) -> object:
    return command("pricing.settings", ORG, request_id, at, {}, data=data)


def test_the_record_is_applied_once_and_ingest_reads_it_in_memory(tmp_path: Path) -> None:
    first, later = _record("req-1", 1_000, FIRST), _record("req-2", 2_000, SECOND)

    async def run() -> None:
        async with Store(tmp_path / "db.duckdb") as store:
            assert store.pricing_of(ORG) is None
            ok, value = await store.apply(first)  # type: ignore[arg-type]
            assert ok and value == {**FIRST, "modified_at_us": 1_000}
            pricing = store.pricing_of(ORG)
            assert pricing is not None and pricing.catalog
            assert str(pricing.markup_percent) == "12.5" and set(pricing.overrides) == {"a/b"}
            assert store.pricing_of(OTHER) is None
        async with Store(tmp_path / "db.duckdb") as store:  # read at open
            assert store.pricing_of(ORG) == pricing
            assert await store.apply(first) == (True, value)  # type: ignore[arg-type]
            with pytest.raises(KeyReused):  # the same id with another request
                await store.apply(_record("req-1", 3_000, SECOND))  # type: ignore[arg-type]
            assert (await store.apply(later))[0]  # type: ignore[arg-type]
            assert store.pricing_of(ORG) is None  # prices nothing
            assert await store.read_now(settings_of, ORG) == {**SECOND, "modified_at_us": 2_000}

    asyncio.run(run())


def _set_in(path: Path) -> None:
    async def run() -> None:
        async with Store(path) as store:
            assert (await store.apply(_record("req-1", 1, FIRST)))[0]  # type: ignore[arg-type]

    asyncio.run(run())


def test_a_data_dir_of_the_previous_main_takes_settings(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"

    async def made() -> None:
        async with Store(path):
            pass

    asyncio.run(made())
    con = duckdb.connect(str(path))
    before_pricing(con)
    con.close()
    _set_in(path)
    con = duckdb.connect(str(path))
    assert settings_of(con, ORG) == {**FIRST, "modified_at_us": 1}
    con.close()


def test_a_new_shard_keeps_them_and_the_digest_counts_them_only_where_set(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    con = duckdb.connect(str(path))
    migrate(con)
    assert "pricing_settings" not in logical_rows(con, ORG)  # as the previous main's digest
    con.close()
    _set_in(path)
    con = duckdb.connect(str(path))
    assert len(logical_rows(con, ORG)["pricing_settings"]) == 1
    assert "pricing_settings" not in logical_rows(con, OTHER)
    segments = Segments(folder_of(path))
    segments.open(con)
    retain(con, segments, "events", [0], lambda organization_id, key: False)  # owns no customer
    assert settings_of(con, ORG) == {**FIRST, "modified_at_us": 1}
    con.close()
