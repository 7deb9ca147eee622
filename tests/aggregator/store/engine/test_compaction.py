"""The ledger's files and checkpoints, and the rollups' segments: a data dir written before
either opens and reads the same, and neither the ledger's checkpoints nor merging
segments changes an answer. (The property tests in test_quantities and
test_ledger_state_machine do both at random points.)"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.engine.migrations import MIGRATIONS, migrate
from aggregator.store.engine.segments import Change
from aggregator.store.engine.writer import Tx
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import get_customer_by_external_id
from aggregator.store.tables.ledger_reads import held_customer_meter
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.quantities import Scope, compute
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import datetime_to_us
from tests.aggregator.store.stored_ledger import stored_consumed, stored_first_us
from tests.deadline import until

ORG = str(uuid.uuid4())
METER = str(uuid.uuid4())
DAY = datetime_to_us(datetime(2026, 3, 2, tzinfo=UTC))
BUCKET = datetime_to_us(datetime(2026, 3, 2, 10, 15, tzinfo=UTC))


def _previous_main_data_dir(path: Path) -> None:
    """Schema step 9 (the main before deltas), with a sum meter's usage as it stored it: keyed
    rollup and ledger rows (two events, tokens 3 and 4, of customer 'acme')."""
    con = duckdb.connect(str(path))
    assert migrate(con, until=9) == 9
    con.execute(
        "INSERT INTO meters (id, organization_id, name, unit, filter, aggregation, metadata,"
        " created_at, backfill_target) VALUES (?, ?, 'tokens', 'scalar', ?, ?, '{}', now(), 0)",
        [
            METER,
            ORG,
            orjson.dumps({"conjunction": "and", "clauses": []}).decode(),
            orjson.dumps({"func": "sum", "property": "tokens"}).decode(),
        ],
    )
    con.execute(
        "INSERT INTO rollups VALUES (?, 'ext:acme', make_timestamptz(?::BIGINT), 2, 7, 3, 4)",
        [METER, BUCKET],
    )
    con.execute(
        "INSERT INTO ledger_usage VALUES (?, 'ext:acme', 2, 7, 3, 4, now(), now())", [METER]
    )
    con.close()


def test_a_data_dir_from_before_deltas_reads_the_same_and_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "meterline.duckdb"
    _previous_main_data_dir(path)

    async def readings(store: Store) -> tuple[float, float, float]:
        def read(con: duckdb.DuckDBPyConnection) -> tuple[float, float, float]:
            meter = get_meter(con, ORG, METER)
            customer = get_customer_by_external_id(con, ORG, "acme")
            assert meter is not None and customer is not None
            scope = Scope(meter, ("ext:acme",))
            end = DAY + 86_400 * 10**6 - 1
            periods, total = compute(con, scope, DAY, end, "day", ZoneInfo("UTC"), None, end)
            return periods[0][1], total, stored_consumed(con, customer, meter)

        return await store.read(read)

    async def run() -> list[tuple[float, float, float]]:
        seen = []
        async with Store(path, checkpoint_seconds=3600) as store:
            # The keyed table's row, moved into a file as it was at open.
            [moved] = store.live.segments.live("ledger_usage")
            assert (moved.level, moved.rows) == (0, 1)
            await store.write(
                create_customer(
                    ORG,
                    CustomerCreate(email="a@example.com", external_id="acme"),
                    0,
                    customer_id=str(uuid.uuid4()),
                )
            )
            seen.append(await readings(store))
            event = Event(
                name="use",
                timestamp_us=BUCKET + 60 * 10**6,
                customer_id=None,
                external_customer_id="acme",
                external_id="later",
                parent_id=None,
                external_member_id=None,
                metadata={"tokens": 5},
                cost_amount=None,
            )
            await store.write(IngestJob(ORG, to_table([event]), BUCKET))
            seen.append(await readings(store))
            await store.checkpoint_ledger()  # the moved row and the new event's: one row
            [checkpoint] = store.live.segments.live("ledger_usage")
            assert checkpoint.number > moved.number and checkpoint.rows == 1
            seen.append(await readings(store))
            await store.checkpoint_ledger()  # nothing written since: none taken
            assert store.live.segments.live("ledger_usage") == [checkpoint]
        async with Store(path) as store:  # reopened: the migration is not run twice
            seen.append(await readings(store))
        return seen

    assert asyncio.run(run()) == [(7, 7, 7), (12, 12, 12), (12, 12, 12), (12, 12, 12)]
    con = duckdb.connect(str(path))
    # The base table's row moved into a file as it was; the new event's rollup is another.
    assert con.execute("SELECT count(*) FROM rollups").fetchall() == [(0,)]
    moved = con.execute("SELECT events, total, low, high FROM all_rollups ORDER BY total")
    assert moved.fetchall() == [(1, 5.0, 5.0, 5.0), (2, 7.0, 3.0, 4.0)]
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchall() == [
        (len(MIGRATIONS),)
    ]
    con.close()


def _rollups(*rows: tuple[str, int, int, float, float, float]) -> pa.Table:
    """Rollup rows of METER: (subject, bucket µs, events, total, low, high), the meter id as
    text (written as a UUID, as DuckDB's rows are)."""
    subjects, buckets, events, totals, lows, highs = zip(*rows, strict=True)
    return pa.table(
        {
            "meter_id": pa.array([METER] * len(rows), pa.string()),
            "subject": pa.array(subjects, pa.string()),
            "bucket": pa.array(buckets, pa.timestamp("us", tz="UTC")),
            "events": pa.array(events, pa.int64()),
            "total": pa.array(totals, pa.float64()),
            "low": pa.array(lows, pa.float64()),
            "high": pa.array(highs, pa.float64()),
        }
    )


async def _add(store: Store, table: pa.Table) -> None:
    """`table` as a new file of the rollups, listed by a writer job."""

    def job(tx: Tx) -> None:
        tx.live.change_segments(tx.con, Change([tx.live.segments.write("rollups", table)]))

    await store.write(job)


def test_a_merge_folds_each_key_once(tmp_path: Path) -> None:
    """Many files' rows for one key become one row holding their merge, in a file of the next
    level that replaces them, its meter id stored as a flush stores it (a UUID, not its text:
    else every read of the rollups casts it, and prunes no row group by meter)."""

    async def run() -> tuple[list[tuple[int, float, float, float]], list[int], pa.DataType]:
        async with Store(tmp_path / "m.duckdb", merge_fanout=4, merge_check_seconds=3600) as store:
            for row in [(1, 2, 2, 2), (2, 5, -1, 4), (1, 1, 1, 1), (1, 9, 9, 9)]:
                await _add(store, _rollups(("s", 0, *row)))
            assert await asyncio.to_thread(store.merger.merge_once)
            assert not await asyncio.to_thread(store.merger.merge_once)  # one file: nothing due
            rows = await store.read(
                lambda con: con.execute(
                    "SELECT events, total, low, high FROM all_rollups"
                ).fetchall()
            )
            [merged] = store.live.segments.live("rollups")
            schema = pq.read_schema(store.live.segments.path(merged))
            return [tuple(r) for r in rows], [merged.level], schema.field("meter_id").type

    assert asyncio.run(run()) == ([(5, 17.0, -1.0, 9.0)], [1], pa.uuid())


def test_segments_are_merged_in_the_background(tmp_path: Path) -> None:
    """The merger merges a level's files once it has `fanout` of them, sorted by meter,
    customer and bucket; the files it merged away are deleted once their grace is over."""

    async def run() -> tuple[int, list[tuple[str, int]], int]:
        async with Store(tmp_path / "m.duckdb", merge_fanout=3, merge_check_seconds=0.02) as store:
            store.live.segments._grace = 0
            for i in range(3):
                rows = [(f"s{9 - j % 10}", j * 10**6, 1, 1.0, 1.0, 1.0) for j in range(i, 30, 3)]
                await _add(store, _rollups(*sorted(rows)))

            async def merged() -> bool:
                return len(store.live.segments.live("rollups")) == 1

            await until("one merged file (within about 50 ms)", merged)
            [merged] = store.live.segments.live("rollups")
            order = await store.read(
                lambda con: con.execute(
                    "SELECT subject, epoch_us(bucket) FROM"
                    f" read_parquet('{store.live.segments.path(merged)}')"
                ).fetchall()  # in storage order
            )
            files = len(list(store.live.segments.folder.iterdir()))
            return merged.level, [(str(s), int(b)) for s, b in order], files

    level, order, files = asyncio.run(run())
    assert level == 1 and files == 1
    assert len(order) == 30 and order == sorted(order)


def test_usage_folded_into_a_later_row_keeps_the_earliest_time(tmp_path: Path) -> None:
    """A group's time is its reader's (in Kafka mode, earlier than a group applied before it,
    even than the meter's creation): a customer meter's created_at is the earliest usage's
    whether its deltas were folded together or into a row folded before, as the balances in
    memory say, and as a core that folded at other moments stores."""
    made = BUCKET
    definition = MeterCreate.model_validate(
        {
            "name": "uses",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "count"},
        }
    )

    def use(external_id: str, at_us: int) -> IngestJob:
        event = Event(
            name="use",
            timestamp_us=made,
            customer_id=None,
            external_customer_id="acme",
            external_id=external_id,
            parent_id=None,
            external_member_id=None,
            metadata={},
            cost_amount=None,
        )
        return IngestJob(ORG, to_table([event]), at_us)

    async def run() -> list[tuple[int, int]]:
        seen = []

        async def created() -> None:
            def read(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
                meter = get_meter(con, ORG, METER)
                customer = get_customer_by_external_id(con, ORG, "acme")
                assert meter is not None and customer is not None
                held = held_customer_meter(store.live.balances, customer, meter)
                return stored_first_us(con, customer, meter), held.created_at_us

            seen.append(await store.read(read))

        path = tmp_path / "m.duckdb"
        async with Store(path, checkpoint_seconds=3600) as store:
            customer = CustomerCreate(email="a@example.com", external_id="acme")
            await store.write(create_customer(ORG, customer, made, customer_id=str(uuid.uuid4())))
            await store.write(create_meter(ORG, definition, made, meter_id=METER))
            await store.write(use("later", made + 10**6))
            await store.checkpoint_ledger()
            await store.write(use("earlier", made - 10**6))
            await created()
            await store.checkpoint_ledger()
            await created()
        async with Store(path) as store:
            await created()
        return seen

    assert asyncio.run(run()) == [(made - 10**6, made - 10**6)] * 3


def test_a_meter_redefined_during_a_merge_keeps_none_of_its_rollups(tmp_path: Path) -> None:
    """A merge that read the files before a redefinition deleted the meter's rows must not
    bring them back: its file is not listed (its inputs are gone), and the next merge reads
    what the redefinition left."""

    async def run() -> int:
        async with Store(tmp_path / "m.duckdb", merge_fanout=2, merge_check_seconds=3600) as store:
            for i in range(2):
                await _add(store, _rollups(*[(f"s{j}", j, 1, 1.0, 1.0, 1.0) for j in range(i, 10)]))
            segments = store.live.segments
            inputs = segments.due()
            change = await asyncio.to_thread(segments.merge, store._con.cursor(), inputs)  # type: ignore[union-attr]
            await store.write(
                lambda tx: tx.live.delete_rows(tx.con, "rollups", "meter_id = ?::UUID", [METER])
            )
            assert not await asyncio.to_thread(store.merger.list_merged, inputs, change)
            assert not segments.path(change.added[0]).exists()
            rows = await store.read(
                lambda con: con.execute("SELECT count(*) FROM all_rollups").fetchall()
            )
            return int(rows[0][0])

    assert asyncio.run(run()) == 0
