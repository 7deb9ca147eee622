"""The balance check reads its customer and meter from memory (`store.catalog`): what it holds
must never answer differently from DuckDB, whatever changed since it was read."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from aggregator.api.ledger_shapes import balance_check
from aggregator.errors import NotFound
from aggregator.services.ledger_service import check
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import MeterRow, get_meter
from aggregator.store.engine.writer import Tx
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import update_job as update_customer
from aggregator.store.tables.meter_tables import backfill_step_job, create_job, update_job
from meters.customer_rules import CustomerCreate, CustomerUpdate
from meters.definitions import MeterCreate, MeterUpdate
from meters.events import Event, to_table
from meters.times import now_us

ORG = str(uuid.uuid4())
OTHER_ORG = str(uuid.uuid4())


def _use(tokens: int, *, customer_id: str | None = None, external: str | None = None) -> Event:
    return Event(
        name="use",
        timestamp_us=now_us(),
        customer_id=customer_id,
        external_customer_id=external,
        external_id=None,
        parent_id=None,
        external_member_id=None,
        metadata={"tokens": tokens},
        cost_amount=None,
    )


async def _check(store: Store, meter_id: str, **customer: str) -> dict[str, Any]:
    return dict(
        balance_check(
            await check(
                store,
                ORG,
                meter_id,
                customer.get("customer_id"),
                customer.get("external_customer_id"),
                0.0,
            )
        )
    )


async def _tokens(store: Store) -> MeterRow:
    """A sum meter of the `tokens` property."""
    definition = MeterCreate.model_validate(
        {
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
    )
    meter: MeterRow = await store.write(
        create_job(ORG, definition, now_us(), meter_id=str(uuid.uuid4()))
    )
    return meter


def test_the_check_follows_redefinitions_and_late_external_ids(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "m.duckdb"
        async with Store(path) as store:
            meter = await _tokens(store)
            held = await store.write(
                create_customer(
                    ORG,
                    CustomerCreate(email="a@b.io", external_id="acme"),
                    now_us(),
                    customer_id=str(uuid.uuid4()),
                )
            )
            plain = await store.write(
                create_customer(
                    ORG, CustomerCreate(email="p@b.io"), now_us(), customer_id=str(uuid.uuid4())
                )
            )
        # Reopened: `acme` is held from the start; `plain` (no external id yet) is not.
        async with Store(path) as store:
            events = [_use(5, external="acme"), _use(7, external="acme"), _use(2, external="late")]
            await store.write(IngestJob(ORG, to_table(events), now_us()))
            await store.write(IngestJob(ORG, to_table([_use(1, customer_id=plain.id)]), now_us()))
            assert (await _check(store, meter.id, external_customer_id="acme"))[
                "consumed_units"
            ] == 12
            assert (await _check(store, meter.id, customer_id=held.id))["consumed_units"] == 12
            assert (await _check(store, meter.id, customer_id=plain.id))["consumed_units"] == 1

            # Its external id, set after it was first checked, brings that usage in.
            update = CustomerUpdate.model_validate({"external_id": "late"})
            await store.write(update_customer(ORG, plain.id, update, now_us()))
            assert (await _check(store, meter.id, customer_id=plain.id))["consumed_units"] == 3
            assert (await _check(store, meter.id, external_customer_id="late"))[
                "consumed_units"
            ] == 3

            # A redefinition: the check counts with the new aggregation once it is rebuilt.
            redefine = MeterUpdate.model_validate(
                {"aggregation": {"func": "max", "property": "tokens"}}
            )
            redefined = await store.write(update_job(ORG, meter.id, redefine, now_us()))
            step = backfill_step_job(meter.id, redefined.version, 1000)
            while (progress := await store.write(step)) and progress[0] < progress[1]:
                pass
            assert (await _check(store, meter.id, external_customer_id="acme"))[
                "consumed_units"
            ] == 7

            # Another organization's ids are not found, held or not.
            with pytest.raises(NotFound):
                await check(store, OTHER_ORG, meter.id, held.id, None, 0.0)
            with pytest.raises(NotFound):
                await check(store, OTHER_ORG, meter.id, None, "acme", 0.0)

    asyncio.run(scenario())


def test_the_catalogs_meter_is_the_stored_row_whatever_changed(tmp_path: Path) -> None:
    """Holds and credits take their meter from the catalog and answer it whole (backfill
    progress, archival): after a redefinition and each backfill step, within the transaction
    that changed it and after a rollback, the catalog's row is DuckDB's."""

    async def scenario() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            meter = await _tokens(store)
            events = [_use(n, external="acme") for n in range(5)]
            await store.write(IngestJob(ORG, to_table(events), now_us()))

            def same(con: Any) -> None:
                assert store.live.catalog.meter(con, ORG, meter.id) == get_meter(con, ORG, meter.id)

            await store.read(same)
            redefine = MeterUpdate.model_validate({"aggregation": {"func": "count"}})
            redefining = update_job(ORG, meter.id, redefine, now_us())

            def within(tx: Tx) -> MeterRow | None:  # the same transaction reads the new row
                redefining(tx)
                return tx.live.catalog.meter(tx.con, ORG, meter.id)

            seen = await store.write(within)
            assert seen is not None and seen.aggregation.func == "count"
            await store.read(same)
            step = backfill_step_job(meter.id, seen.version, 2)
            while (progress := await store.write(step)) and progress[0] < progress[1]:
                await store.read(same)
            await store.read(same)

            archive = MeterUpdate.model_validate({"is_archived": True})
            archiving = update_job(ORG, meter.id, archive, now_us())

            def failing(tx: Tx) -> None:
                archiving(tx)
                assert tx.live.catalog.meter(tx.con, ORG, meter.id) is not None
                raise RuntimeError("rolled back")

            with pytest.raises(RuntimeError):
                await store.write(failing)
            await store.read(same)
            found = await store.read(lambda con: store.live.catalog.meter(con, ORG, meter.id))
            assert found is not None and found.archived_at_us is None

    asyncio.run(scenario())
