"""A meter's dimensions in the store (`meters.definitions`, issue 64): stored and read back;
changing them is a redefinition (a new version, backfilled), the same ones change nothing, and
a patch is checked on the meter it makes; the digest counts them only where set; a data dir of
the previous main (schema step 31) opens with none, and its write records (no `dimensions`)
and stored outcomes (a meter row without them) still apply and answer."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import orjson
import pytest

from aggregator.services import cluster_service
from aggregator.store import Store, TenantLimits
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import MeterRow, get_meter
from aggregator.store.metering.groups import folds
from aggregator.store.tables.digest import logical_rows
from aggregator.store.tables.meter_tables import backfill_step_job, create_job, update_job
from aggregator.store.tables.quantities import Scope, gather
from meters import commands
from meters.commands import Command
from meters.definitions import MeterCreate, MeterUpdate
from meters.errors import ValidationFailed
from meters.events import EventRules, parse_ingest_body, to_table
from meters.times import now_us
from tests.aggregator.store.schema_before import before_dimensions, before_folded, before_groups

ORG = str(uuid.uuid4())
ALL: dict[str, Any] = {"conjunction": "and", "clauses": []}
LIMITS = dataclasses.asdict(TenantLimits())


def _create(name: str, aggregation: dict[str, Any], **more: Any) -> MeterCreate:
    return MeterCreate.model_validate(
        {"name": name, "filter": ALL, "aggregation": aggregation, **more}
    )


async def _ingest(store: Store, count: int, models: int = 1) -> None:
    events = [
        {
            "name": "call",
            "external_customer_id": "c",
            "external_id": f"e{i}",
            "metadata": {"tokens": i, "model": "m" if models == 1 else f"m{i % models}"},
        }
        for i in range(count)
    ]
    table = to_table(parse_ingest_body({"events": events}, now=now_us(), rules=EventRules()))
    await store.write(IngestJob(ORG, table, now_us()), weight=table.num_rows)


async def _meter(store: Store, meter_id: str) -> MeterRow:
    found = await store.read(get_meter, ORG, meter_id)
    assert found is not None
    return found


async def _patch(store: Store, meter_id: str, body: dict[str, Any]) -> MeterRow:
    patch = MeterUpdate.model_validate(body)
    row: MeterRow = await store.write(update_job(ORG, meter_id, patch, now_us()))
    return row


def test_changing_dimensions_redefines_the_meter_and_the_same_ones_change_nothing(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            await _ingest(store, 30)
            meter_id = str(uuid.uuid4())
            data = _create("tokens", {"func": "sum", "property": "tokens"}, dimensions=["model"])
            made = await store.write(create_job(ORG, data, now_us(), meter_id=meter_id))
            assert made.dimensions == ("model",)
            assert await store.write(backfill_step_job(meter_id, 1, 1000)) is not None
            done = await _meter(store, meter_id)
            assert (done.version, done.backfilling, done.backfilled_events) == (1, False, 30)

            # The same dimensions: nothing changes, not even modified_at.
            assert await _patch(store, meter_id, {"dimensions": ["metadata.model"]}) == done
            assert await _patch(store, meter_id, {"dimensions": None}) == done

            # Others (their order too): a new version, its rollups built again by backfill.
            for dimensions in (["model", "_llm.model"], ["_llm.model", "model"], []):
                before = await _meter(store, meter_id)
                patched = await _patch(store, meter_id, {"dimensions": dimensions})
                assert patched.dimensions == tuple(dimensions)
                assert patched.version == before.version + 1
                assert patched.backfilling and patched.backfilled_events == 0
                assert patched.backfill_events == 30
                version = patched.version
                assert await store.write(backfill_step_job(meter_id, version, 1000)) is not None
                rebuilt = await _meter(store, meter_id)
                assert not rebuilt.backfilling and rebuilt.backfilled_events == 30
                assert rebuilt.dimensions == tuple(dimensions)

    asyncio.run(run())


def test_a_patch_is_checked_on_the_meter_it_makes(tmp_path: Path) -> None:
    """Dimensions go with count, sum, avg, min and max: a patch giving a unique, latest or
    integral aggregation to a meter with dimensions, or dimensions to such a meter, is a 422
    naming `dimensions`, and changes nothing; both at once, or without the dimensions, pass."""

    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            counted, models = str(uuid.uuid4()), str(uuid.uuid4())
            data = _create("calls", {"func": "count"}, dimensions=["model"])
            await store.write(create_job(ORG, data, now_us(), meter_id=counted))
            data = _create("models", {"func": "unique", "property": "model"})
            await store.write(create_job(ORG, data, now_us(), meter_id=models))
            before = {m: await _meter(store, m) for m in (counted, models)}
            refused = [
                (counted, {"aggregation": {"func": "unique", "property": "model"}}),
                (counted, {"aggregation": {"func": "latest", "property": "tokens"}}),
                (counted, {"aggregation": {"func": "integral", "property": "tokens"}}),
                (models, {"dimensions": ["region"]}),
            ]
            for meter_id, body in refused:
                with pytest.raises(ValidationFailed) as raised:
                    await _patch(store, meter_id, body)
                (error,) = raised.value.errors
                assert error.loc == ("body", "dimensions"), body
                assert "count, sum, avg, min and max" in error.msg
            assert {m: await _meter(store, m) for m in before} == before

            summed = {"aggregation": {"func": "sum", "property": "tokens"}}
            assert (await _patch(store, counted, summed)).dimensions == ("model",)
            unique = {"aggregation": {"func": "unique", "property": "model"}, "dimensions": []}
            assert (await _patch(store, counted, unique)).dimensions == ()
            back = {"aggregation": {"func": "max", "property": "tokens"}, "dimensions": ["r"]}
            assert (await _patch(store, models, back)).dimensions == ("r",)

    asyncio.run(run())


def test_the_digest_counts_dimensions_only_where_set(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            meter_id = str(uuid.uuid4())
            await store.write(
                create_job(ORG, _create("calls", {"func": "count"}), 0, meter_id=meter_id)
            )
            plain = await cluster_service.digest(store, ORG, None)
            rows = await store.read(logical_rows, ORG)
            assert "meter_dimensions" not in rows  # as the previous main's digest
            assert len(rows["meters"][0]) == 17 - 2  # the previous main's columns, less 2 left out
            await _patch(store, meter_id, {"dimensions": ["model"]})
            rows = await store.read(logical_rows, ORG)
            assert rows["meter_dimensions"] == [(uuid.UUID(meter_id), ["model"])]
            other = await cluster_service.digest(store, ORG, None)
            await _patch(store, meter_id, {"dimensions": ["region"]})
            third = await cluster_service.digest(store, ORG, None)
            assert len({plain.sha256, other.sha256, third.sha256}) == 3
            assert other.tables["meter_dimensions"] != third.tables["meter_dimensions"]

    asyncio.run(run())


def test_records_carry_dimensions_through_their_json(tmp_path: Path) -> None:
    """A create and a patch as the services record them, encoded as the control topic carries
    them and decoded, apply with their dimensions; a record without them, with none."""
    meter_id = str(uuid.uuid4())
    drawn = {"limits": TenantLimits(), "meter_id": meter_id}
    data = _create("tokens", {"func": "sum", "property": "tokens"}, dimensions=["metadata.model"])
    made = commands.command("meter.create", ORG, "c", now_us(), drawn, data=data)
    assert made.args["data"]["dimensions"] == ["model"]
    patch = MeterUpdate.model_validate({"dimensions": ["_llm.model", "model"]})
    patched = commands.command(
        "meter.update",
        ORG,
        "u",
        now_us(),
        {"limits": TenantLimits()},
        meter_id=meter_id,
        data=patch,
    )
    named = MeterUpdate.model_validate({"name": "tokens!"})
    renamed = commands.command(
        "meter.update",
        ORG,
        "n",
        now_us(),
        {"limits": TenantLimits()},
        meter_id=meter_id,
        data=named,
    )
    assert "dimensions" not in renamed.args["data"]

    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            found = []
            for record in (made, patched, renamed):
                ok, row = await store.apply(commands.decode(commands.encode(record)))
                assert ok, row
                found.append((row.dimensions, row.version))
            assert found == [
                (("model",), 1),
                (("_llm.model", "model"), 2),
                (("_llm.model", "model"), 2),
            ]

    asyncio.run(run())


def _record(kind: str, request_id: str, **args: Any) -> Command:
    return Command(kind, request_id, ORG, now_us(), args, {"limits": LIMITS})


def test_a_data_dir_of_the_previous_main_opens_and_its_records_still_apply(
    tmp_path: Path,
) -> None:
    """Its meters have no dimensions; a record it wrote (its `data` without `dimensions`)
    applies as one without them; an outcome it stored (a meter row without them) answers a
    resend."""
    path = tmp_path / "m.duckdb"
    old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
    created = {"name": "calls", "filter": ALL, "aggregation": {"func": "count"}}

    async def make() -> None:
        async with Store(path) as store:
            ok, _ = await store.apply(_record("meter.create", "r1", data=created, meter_id=old_id))
            assert ok

    async def reopen() -> None:
        async with Store(path) as store:
            assert (await _meter(store, old_id)).dimensions == ()
            # The previous main's outcome of r1, answered again: its row has no dimensions.
            ok, again = await store.apply(
                _record("meter.create", "r1", data=created, meter_id=old_id)
            )
            assert ok and again.id == old_id and again.dimensions == ()
            ok, made = await store.apply(
                _record("meter.create", "r2", data=created, meter_id=new_id)
            )
            assert ok and made.dimensions == ()
            update = {"data": {"name": "calls!"}, "meter_id": new_id}
            ok, renamed = await store.apply(_record("meter.update", "r3", **update))
            assert ok and (renamed.name, renamed.dimensions, renamed.version) == ("calls!", (), 1)

    asyncio.run(make())
    con = duckdb.connect(str(path))  # back to the schema of step 31
    before_dimensions(con)
    # The outcome as the previous main stored it: a meter row without the field.
    (outcome,) = con.execute(
        "SELECT outcome FROM command_outcomes WHERE request_id = 'r1'"
    ).fetchall()[0]
    value = orjson.loads(outcome)
    del value[1]["fields"]["dimensions"]
    con.execute(
        "UPDATE command_outcomes SET outcome = ? WHERE request_id = 'r1'",
        [orjson.dumps(value).decode()],
    )
    assert "dimensions" not in [r[0] for r in con.execute("DESCRIBE meters").fetchall()]
    con.close()
    asyncio.run(reopen())


async def _grouped(store: Store, meter_id: str, window: tuple[int, int]) -> dict[str, float]:
    """The meter's totals over `window` per model (the groups' keys)."""
    meter = await _meter(store, meter_id)
    scope = Scope(meter, None, group_by=("model",))
    found = await store.read(gather, scope, *window, "month", ZoneInfo("UTC"), 0)
    groups, _ = found.groups(meter)
    return {key: total for key, _, total in groups}


async def _by_model(store: Store, meter_id: str) -> None:
    """40 events of 4 models, then a sum meter of their tokens by model, backfilled."""
    await _ingest(store, 40, models=4)
    data = _create("tokens", {"func": "sum", "property": "tokens"}, dimensions=["model"])
    await store.write(create_job(ORG, data, now_us(), meter_id=meter_id))
    assert await store.write(backfill_step_job(meter_id, 1, 25)) is not None
    assert await store.write(backfill_step_job(meter_id, 1, 25)) is not None


def test_a_data_dir_of_schema_32_opens_with_its_meters_groups_derived(tmp_path: Path) -> None:
    """A meter given dimensions before the rollups kept its groups: the store derives them
    from its stored events when it opens (migration 33), and its grouped quantities, read from
    them, are what they were read from the events."""
    path = tmp_path / "m.duckdb"
    meter_id = str(uuid.uuid4())
    window = (0, now_us() + 3_600_000_000)

    async def make() -> dict[str, float]:
        async with Store(path) as store:
            await _by_model(store, meter_id)
            return await _grouped(store, meter_id, window)

    async def reopen() -> tuple[dict[str, float], int]:
        async with Store(path) as store:
            rows = await store.read(
                lambda con: con.execute(
                    "SELECT (SELECT count(*) FROM all_rollup_groups),"
                    " (SELECT count(*) FROM rollup_groups_pending)"
                ).fetchall()[0]
            )
            assert rows[1] == 0
            return await _grouped(store, meter_id, window), int(rows[0])

    before = asyncio.run(make())
    assert len(before) == 4 and math.isclose(sum(before.values()), sum(range(40)))
    con = duckdb.connect(str(path))
    before_groups(con)
    con.close()
    after, stored = asyncio.run(reopen())
    assert stored > 0  # read from the groups' rows, derived
    assert after == before


def test_a_data_dir_of_schema_34_lists_its_dimensioned_meters_as_folded(tmp_path: Path) -> None:
    """Before migration 35 no meter was listed as having folded values: every meter with
    dimensions is listed then (any may have), and its grouped quantities are what they were.
    Made by this version, a meter whose values never folded is not listed."""
    path = tmp_path / "m.duckdb"
    meter_id = str(uuid.uuid4())
    window = (0, now_us() + 3_600_000_000)

    async def opened(make: bool) -> tuple[dict[str, float], bool]:
        async with Store(path) as store:
            if make:
                await _by_model(store, meter_id)
            return await _grouped(store, meter_id, window), await store.read(folds, meter_id)

    before, listed = asyncio.run(opened(make=True))
    assert len(before) == 4 and not listed  # 4 models: far below the bound
    con = duckdb.connect(str(path))
    before_folded(con)
    con.close()
    after, listed = asyncio.run(opened(make=False))
    assert listed and after == before
