"""An organization's OTLP settings in the store: set, replaced, read back per organization; the
`otlp.settings` record applied once per request id; a data dir of the previous schema (step 24)
takes them; a new shard keeps them; the digest counts them only where they are set."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from aggregator.errors import KeyReused
from aggregator.store import Store, logical_rows
from aggregator.store.engine.migrations import MIGRATIONS, migrate
from aggregator.store.engine.segments import Segments, folder_of
from aggregator.store.tables.otlp_settings import set_job, settings_of
from aggregator.store.tables.shard_retention import retain
from meters.commands import command
from meters.errors import ValidationFailed

ORG = str(uuid.uuid4())
OTHER = str(uuid.uuid4())
PRICES = {
    "version": "2025-01",
    "currency": "usd",
    "models": {"gpt-x": {"input": "0.5", "output": "1.5", "cached_input": "0.05"}},
}
FIRST = {"customer_attributes": ["tenant.id"], "prices": PRICES}
SECOND = {"customer_attributes": ["app.customer", "org.slug"], "prices": None}


def _read(store: Store, organization_id: str) -> Any:
    return store.read_now(settings_of, organization_id)


def test_set_read_replace_and_another_organization(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "db.duckdb") as store:
            assert await _read(store, ORG) is None
            written = await store.write(set_job(ORG, FIRST, 1_000_000))
            assert written == {**FIRST, "modified_at_us": 1_000_000}
            assert await _read(store, ORG) == written
            assert await _read(store, OTHER) is None

            again = await store.write(set_job(ORG, SECOND, 2_000_000))
            assert again == {**SECOND, "modified_at_us": 2_000_000}
            assert await _read(store, ORG) == again
            assert await _read(store, OTHER) is None
            rows = await store.read_now(
                lambda con: con.execute("SELECT count(*) FROM otlp_settings").fetchall()
            )
            assert rows == [(1,)]
        async with Store(tmp_path / "db.duckdb") as store:  # kept across a reopen
            assert await _read(store, ORG) == again

    asyncio.run(run())


def test_settings_without_prices_store_none_and_nothing_set_is_no_settings(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "db.duckdb") as store:
            written = await store.write(set_job(ORG, {"customer_attributes": ["a"]}, 5))
            assert written == {"customer_attributes": ["a"], "prices": None, "modified_at_us": 5}
            unset = await store.write(set_job(ORG, {"customer_attributes": []}, 6))
            assert unset == {"customer_attributes": [], "prices": None, "modified_at_us": None}
            assert await _read(store, ORG) is None  # no row: the digest leaves it out again

    asyncio.run(run())


def test_the_record_is_applied_once_per_request_id(tmp_path: Path) -> None:
    first = command("otlp.settings", ORG, "req-1", 1_000_000, {}, data=FIRST)
    later = command("otlp.settings", ORG, "req-2", 2_000_000, {}, data=SECOND)
    # The same request sent again, later: answered as the first time.
    resent = command("otlp.settings", ORG, "req-1", 3_000_000, {}, data=FIRST)
    reused = command("otlp.settings", ORG, "req-1", 4_000_000, {}, data=SECOND)

    async def run() -> None:
        async with Store(tmp_path / "db.duckdb") as store:
            ok, value = await store.apply(first)
            assert ok and value == {**FIRST, "modified_at_us": 1_000_000}
            assert await store.apply(later) == (True, {**SECOND, "modified_at_us": 2_000_000})
            assert await store.apply(resent) == (True, value)
            assert await _read(store, ORG) == {**SECOND, "modified_at_us": 2_000_000}
            with pytest.raises(KeyReused):  # the same id with another request
                await store.apply(reused)
        async with Store(tmp_path / "db.duckdb") as store:  # the outcome is stored
            assert await store.apply(resent) == (True, value)

    asyncio.run(run())


def test_a_record_without_attributes_is_refused(tmp_path: Path) -> None:
    bad = command("otlp.settings", ORG, "req-1", 1, {}, data={"prices": None})

    async def run() -> None:
        async with Store(tmp_path / "db.duckdb") as store:
            ok, error = await store.apply(bad)
            assert not ok and isinstance(error, ValidationFailed)
            assert await _read(store, ORG) is None

    asyncio.run(run())


def test_a_data_dir_of_step_24_takes_settings(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, until=24) == 24
    con.close()

    async def run() -> None:
        async with Store(path) as store:
            assert await _read(store, ORG) is None
            await store.write(set_job(ORG, FIRST, 7))
            assert await _read(store, ORG) == {**FIRST, "modified_at_us": 7}

    asyncio.run(run())
    con = duckdb.connect(str(path))
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchall() == [
        (len(MIGRATIONS),)
    ]
    con.close()


def _set_in(path: Path, organization_id: str, settings: Any) -> None:
    """A data dir where the organization set `settings` (at 1), closed."""

    async def run() -> None:
        async with Store(path) as store:
            await store.write(set_job(organization_id, settings, 1))

    asyncio.run(run())


def test_a_new_shard_keeps_every_organizations_settings(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    _set_in(path, ORG, FIRST)
    con = duckdb.connect(str(path))
    segments = Segments(folder_of(path))
    segments.open(con)
    retain(con, segments, "events", [0], lambda organization_id, key: False)  # owns no customer
    assert settings_of(con, ORG) == {**FIRST, "modified_at_us": 1}
    con.close()


def test_the_digest_counts_settings_only_where_set(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    con = duckdb.connect(str(path))
    migrate(con)
    assert "otlp_settings" not in logical_rows(con, ORG)  # as the previous main's digest
    con.close()
    _set_in(path, ORG, FIRST)
    con = duckdb.connect(str(path))
    assert len(logical_rows(con, ORG)["otlp_settings"]) == 1
    assert "otlp_settings" not in logical_rows(con, OTHER)
    con.close()


@pytest.mark.parametrize("prices", [PRICES, None])
def test_the_stored_document_is_the_settings_as_given(tmp_path: Path, prices: Any) -> None:
    path = tmp_path / "db.duckdb"
    settings = {"customer_attributes": ["a", "b"], "prices": prices}
    _set_in(path, ORG, settings)
    con = duckdb.connect(str(path))
    stored = con.execute("SELECT settings::VARCHAR FROM otlp_settings").fetchall()[0][0]
    assert orjson.loads(stored) == settings
    con.close()
