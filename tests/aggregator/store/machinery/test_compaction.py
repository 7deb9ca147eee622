"""Appended rollup and ledger deltas: a data dir written before them opens and reads the same,
and neither compaction (the ledger's) nor rewriting the rollups sorted changes an answer. (The
property tests in test_quantities and test_ledger_state_machine do both at random points.)"""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import orjson
import pytest

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.machinery.compaction import compact, recluster
from aggregator.store.machinery.migrations import MIGRATIONS, migrate
from aggregator.store.machinery.recluster import ReclusterSettings
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import get_customer_by_external_id
from aggregator.store.tables.ledger_tables import customer_meter, held_customer_meter
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.quantities import Scope, compute
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import datetime_to_us
from tests.deadline import until

ORG = str(uuid.uuid4())
METER = str(uuid.uuid4())
NEVER = ReclusterSettings(min_rows=10**12)
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


def test_a_data_dir_from_before_deltas_reads_the_same_and_compacts(tmp_path: Path) -> None:
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
            return periods[0][1], total, customer_meter(con, customer, meter).consumed

        return await store.read(read)

    async def run() -> list[tuple[float, float, float]]:
        seen = []
        async with Store(path, compact_seconds=3600) as store:
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
            assert await store.write(lambda tx: compact(tx.con)) == 1  # one ledger delta
            assert await store.read_now(recluster, "rollups") == 1  # its two rows, merged
            seen.append(await readings(store))
            assert await store.write(lambda tx: compact(tx.con)) == 0
        async with Store(path) as store:  # reopened: the migration is not run twice
            seen.append(await readings(store))
        return seen

    assert asyncio.run(run()) == [(7, 7, 7), (12, 12, 12), (12, 12, 12), (12, 12, 12)]
    con = duckdb.connect(str(path))
    keyed = con.execute("SELECT events, total, low, high FROM rollups").fetchall()
    assert keyed == [(3, 12.0, 3.0, 5.0)]
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchall() == [
        (len(MIGRATIONS),)
    ]
    con.close()


def test_a_rewrite_folds_each_key_once(tmp_path: Path) -> None:
    """Many batches' deltas for one key become one row holding their merge."""

    async def run() -> list[tuple[int, float, float, float]]:
        async with Store(tmp_path / "m.duckdb", recluster=NEVER) as store:
            await store.write(
                lambda tx: tx.con.execute(
                    "INSERT INTO rollup_deltas VALUES"
                    " (?, 's', make_timestamptz(0), 1, 2, 2, 2),"
                    " (?, 's', make_timestamptz(0), 2, 5, -1, 4),"
                    " (?, 's', make_timestamptz(0), 1, 1, 1, 1)",
                    [METER] * 3,
                )
            )
            await store.read_now(recluster, "rollups")
            await store.write(
                lambda tx: tx.con.execute(
                    "INSERT INTO rollup_deltas VALUES (?, 's', make_timestamptz(0), 1, 9, 9, 9)",
                    [METER],
                )
            )
            await store.read_now(recluster, "rollups")
            rows = await store.read(
                lambda con: con.execute("SELECT events, total, low, high FROM rollups").fetchall()
            )
            return [tuple(r) for r in rows]

    assert asyncio.run(run()) == [(5, 17.0, -1.0, 9.0)]


def test_deltas_are_folded_in_the_background(tmp_path: Path) -> None:
    """The flusher compacts the ledger's deltas; the reclusterer rewrites rollups with theirs,
    sorted by meter, customer and bucket."""
    eager = ReclusterSettings(min_rows=1, quiet_seconds=0, check_seconds=0.02)

    async def run() -> list[tuple[str, int]]:
        async with Store(tmp_path / "m.duckdb", compact_seconds=0, recluster=eager) as store:
            await store.write(
                lambda tx: tx.con.execute(
                    "INSERT INTO rollup_deltas SELECT ?, 's' || (9 - i % 10), make_timestamptz(i),"
                    " 1, 1, 1, 1 FROM range(30) t(i)",
                    [METER],
                ).execute(
                    "INSERT INTO ledger_usage_deltas VALUES (?, 's', 1, 1, 1, 1, now(), now())",
                    [METER],
                )
            )

            async def folded() -> bool:
                rows = await store.read(
                    lambda con: con.execute(
                        "SELECT (SELECT count(*) FROM rollup_deltas)"
                        " + (SELECT count(*) FROM ledger_usage_deltas)"
                    ).fetchall()
                )
                return not rows[0][0]

            await until("both deltas folded (within about 50 ms)", folded)
            order = await store.read(
                lambda con: con.execute(
                    "SELECT subject, epoch_us(bucket) FROM rollups"
                ).fetchall()  # in storage order
            )
            return [(str(s), int(b)) for s, b in order]

    order = asyncio.run(run())
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
                return customer_meter(con, customer, meter).created_at_us, held.created_at_us

            seen.append(await store.read(read))

        path = tmp_path / "m.duckdb"
        async with Store(path, compact_seconds=3600) as store:
            customer = CustomerCreate(email="a@example.com", external_id="acme")
            await store.write(create_customer(ORG, customer, made, customer_id=str(uuid.uuid4())))
            await store.write(create_meter(ORG, definition, made, meter_id=METER))
            await store.write(use("later", made + 10**6))
            await store.write(lambda tx: compact(tx.con))
            await store.write(use("earlier", made - 10**6))
            await created()
            await store.write(lambda tx: compact(tx.con))
            await created()
        async with Store(path) as store:
            await created()
        return seen

    assert asyncio.run(run()) == [(made - 10**6, made - 10**6)] * 3


class _Paused:
    """A cursor that stops after the statement starting with `after`, until released."""

    def __init__(self, con: duckdb.DuckDBPyConnection, after: str) -> None:
        self._con, self._after = con, after
        self.reached, self.release = threading.Event(), threading.Event()

    def execute(self, sql: str, *args: object) -> duckdb.DuckDBPyConnection:
        result = self._con.execute(sql, *args)
        if sql.startswith(self._after):
            self.reached.set()
            self.release.wait(10)
        return result


@pytest.mark.parametrize("pause_after", ["INSERT INTO rollups_next", "DELETE FROM rollup_deltas"])
@pytest.mark.parametrize("deltas", [True, False])
def test_a_meter_redefined_during_a_rewrite_keeps_none_of_its_rollups(
    tmp_path: Path, pause_after: str, deltas: bool
) -> None:
    """A rewrite that read the rollups before a redefinition deleted the meter's must not
    bring them back, whichever reaches its delete first: the later one conflicts, and runs
    again (the writer's job) or later (the rewrite)."""

    async def run() -> int:
        async with Store(tmp_path / "m.duckdb", recluster=NEVER) as store:
            add = (
                "INSERT INTO rollup_deltas SELECT ?, 's' || i, make_timestamptz(i), 1, 1, 1, 1"
                " FROM range(10) t(i)"
            )
            await store.write(lambda tx: tx.con.execute(add, [METER]))
            await store.read_now(recluster, "rollups")
            if deltas:
                await store.write(lambda tx: tx.con.execute(add, [METER]))
            paused = _Paused(store._con.cursor(), pause_after)  # type: ignore[union-attr]
            rewrite = asyncio.get_running_loop().run_in_executor(None, recluster, paused, "rollups")
            await asyncio.to_thread(paused.reached.wait, 10)
            redefinition = asyncio.ensure_future(
                store.write(
                    lambda tx: [
                        tx.con.execute(f"DELETE FROM {table} WHERE meter_id = ?", [METER])
                        for table in ("rollups", "rollup_deltas")
                    ]
                )
            )
            await asyncio.sleep(0.2)  # the point: the redefinition queued behind the rewrite
            paused.release.set()

            await asyncio.gather(rewrite, return_exceptions=True)
            await redefinition
            rows = await store.read(
                lambda con: con.execute("SELECT count(*) FROM all_rollups").fetchall()
            )
            return int(rows[0][0])

    assert asyncio.run(run()) == 0
