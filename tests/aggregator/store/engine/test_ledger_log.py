"""The ledger's durable image (`ledger_log`): the flusher checkpoints the balances in the
background and each checkpoint replaces the files and changes it covers; a checkpoint that
fails leaves the image as it was; a data dir of the previous main (the ledger in keyed
tables) reads back the same balances. (Crashes at every step of a checkpoint:
`test_segment_crashes`; any sequence of ledger writes, checkpoints and crashes:
`test_ledger_state_machine`.)"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine.balances import Balances
from aggregator.store.engine.segments import LEDGER_RELATIONS, Segments, folder_of
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_tables import reset_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import ResetCreate
from meters.times import now_us
from tests.aggregator.store.schema_before import before_ledger_checkpoints
from tests.aggregator.store.stored_ledger import crash_image
from tests.deadline import until

ORG = str(uuid.uuid4())
AGGREGATIONS = (
    {"func": "sum", "property": "n"},
    {"func": "max", "property": "n"},
    {"func": "latest", "property": "n"},
    {"func": "unique", "property": "n"},
)


async def _setup(store: Store) -> tuple[str, list[str]]:
    """Two customers (acme with a customer id, bolt by its external id only), a meter of each
    aggregation; the customer id of acme and the meters' ids."""
    acme = await store.write(
        create_customer(
            ORG,
            CustomerCreate(email="a@x.co", external_id="acme"),
            0,
            customer_id=str(uuid.uuid4()),
        )
    )
    meters = []
    for aggregation in AGGREGATIONS:
        definition = MeterCreate.model_validate(
            {
                "name": str(aggregation["func"]),
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": aggregation,
            }
        )
        meter = await store.write(create_meter(ORG, definition, 0, meter_id=str(uuid.uuid4())))
        meters.append(meter.id)
    return acme.id, meters


async def _use(store: Store, *uses: tuple[str, int]) -> None:
    events = [
        Event("use", now_us(), None, customer, None, None, None, {"n": n}, None)
        for customer, n in uses
    ]
    await store.write(IngestJob(ORG, to_table(events), now_us()))


async def _reset(store: Store, customer_id: str, meter_id: str) -> None:
    data = ResetCreate(
        customer_id=uuid.UUID(customer_id),
        meter_id=uuid.UUID(meter_id),
        external_id=str(uuid.uuid4()),
    )
    await store.write(reset_job(ORG, data, now_us()))


def _held(store: Store) -> list[Any]:
    """Everything the balances hold, in order."""
    with store.live.balances.lock:
        tables = store.live.balances.export()
    return [sorted(map(tuple, zip(*t.to_pydict().values(), strict=True))) for t in tables]


async def _read_back_after_a_crash(store: Store, folder: Path) -> None:
    """A start on what a kill -9 of `store` would leave reads back what its balances hold."""
    held = _held(store)
    crashed = folder / "crashed" / "m.duckdb"
    crashed.parent.mkdir()
    await crash_image(store, crashed)
    async with Store(crashed, checkpoint_seconds=3600) as reopened:
        assert _held(reopened) == held


async def _count(store: Store, table: str) -> int:
    rows = await store.read(lambda con: con.execute(f"SELECT count(*) FROM {table}").fetchall())
    return int(rows[0][0])


def test_the_flusher_checkpoints_the_balances_and_empties_what_they_cover(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb", checkpoint_seconds=0.05) as store:
            acme, meters = await _setup(store)
            await _use(store, ("acme", 3), ("bolt", 4), ("acme", 5))
            await _reset(store, acme, meters[0])  # a change other than usage added

            def files() -> list[Any]:
                return [s for r in LEDGER_RELATIONS for s in store.live.segments.live(r)]

            async def covered() -> bool:
                # One file per relation (the flushes' and the backfills' replaced), no change.
                return len(files()) == 3 and not await _count(store, "ledger_changes")

            await until("a checkpoint (within about 50 ms)", covered)
            assert {s.relation for s in files()} == set(LEDGER_RELATIONS)
            await _read_back_after_a_crash(store, tmp_path)

    asyncio.run(run())


def test_a_checkpoint_that_fails_leaves_the_image_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its files are deleted, what it would have emptied is kept, and a start reads back what
    the balances hold."""

    async def run() -> None:
        async with Store(tmp_path / "m.duckdb", checkpoint_seconds=3600) as store:
            store.live.segments._grace = 0  # retired files deleted at once: the folder is the list
            acme, meters = await _setup(store)
            await _use(store, ("acme", 3), ("bolt", 4))
            await store.checkpoint_ledger()
            await _use(store, ("acme", 7))
            await _reset(store, acme, meters[1])
            listed = {s.name for r in LEDGER_RELATIONS for s in store.live.segments.live(r)}
            commit = Segments.commit

            def failing(self: Segments, con: duckdb.DuckDBPyConnection, change: Any) -> None:
                commit(self, con, change)
                if any(s.relation in LEDGER_RELATIONS for s in change.added):
                    raise OSError("the disk went away")

            monkeypatch.setattr(Segments, "commit", failing)
            with pytest.raises(OSError, match="went away"):
                await store.checkpoint_ledger()
            monkeypatch.undo()
            assert await _count(store, "ledger_changes") == 1
            assert {s.name for r in LEDGER_RELATIONS for s in store.live.segments.live(r)} == listed
            ledger_files = {
                p.name for p in folder_of(Path(store.path)).iterdir() if p.name.startswith("ledger")
            }
            assert ledger_files == listed
            await _read_back_after_a_crash(store, tmp_path)

    asyncio.run(run())


def test_a_data_dir_of_the_previous_main_reads_back_the_same_balances(tmp_path: Path) -> None:
    """Its keyed tables move into a checkpoint's files at open; the balances are as they were,
    and after a checkpoint of the current code and another start too."""
    path = tmp_path / "m.duckdb"

    async def write() -> list[Any]:
        async with Store(path) as store:
            acme, meters = await _setup(store)
            await _use(store, ("acme", 3), ("bolt", 4), ("acme", 5), ("bolt", 1))
            await _reset(store, acme, meters[3])
            await _use(store, ("acme", 2))
            return _held(store)

    held = asyncio.run(write())
    con = duckdb.connect(str(path))
    before_ledger_checkpoints(con)
    assert con.execute("SELECT count(*) FROM ledger_usage").fetchall() != [(0,)]
    con.close()

    async def reopened() -> list[list[Any]]:
        seen = []
        async with Store(path, checkpoint_seconds=3600) as store:
            seen.append(_held(store))
            assert await _count(store, "ledger_usage") == 0  # moved into a file
            await _use(store, ("bolt", 9))
            await store.checkpoint_ledger()
            seen.append(_held(store))
        async with Store(path) as store:
            seen.append(_held(store))
        return seen

    first, checkpointed, again = asyncio.run(reopened())
    assert first == held
    assert checkpointed == again != held  # bolt's new usage is in both


def test_export_is_what_add_takes(tmp_path: Path) -> None:
    """The balances exported and added to empty ones hold the same (`Balances.export`)."""

    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            await _setup(store)
            await _use(store, ("acme", 3), ("bolt", 4), ("acme", 5))
            with store.live.balances.lock:
                numbers, values, points = store.live.balances.export()
            copy = Balances()
            copy.add(ORG, numbers, values, points)
            with copy.lock:
                assert [t.to_pylist() for t in copy.export()] == [
                    t.to_pylist() for t in (numbers, values, points)
                ]
            assert (
                isinstance(numbers, pa.Table) and numbers.num_rows == 6
            )  # 2 customers x 3 (a unique meter's: values)

    asyncio.run(run())
