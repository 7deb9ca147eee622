"""A meter DuckDB cannot evaluate never blocks a batch: the events commit, the meter is marked
failed (and skipped) and every other meter, of this organization or another, is applied."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import orjson
import pytest

from aggregator.auth import TokenRegistry
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.engine.migrations import migrate
from aggregator.store.metering import meter_sql
from aggregator.store.tables.meter_tables import backfill_step_job, create_job, update_job
from meters.definitions import MeterCreate, MeterUpdate
from meters.events import Event, to_table
from meters.times import now_us
from tests.deadline import wait_for
from tests.pipeline import Pipeline
from tests.processes import new_org_token

ORG_A, ORG_B = str(uuid.uuid4()), str(uuid.uuid4())
TOKENS = {"func": "sum", "property": "tokens"}
EVERYTHING = {"conjunction": "and", "clauses": []}
# What earlier versions accepted and stored. DuckDB 1.x refused it ("Cannot have wildcards in
# JSON path ..."); DuckDB 2 reads the quoted `$."*"` as a plain member, so no stored definition
# is known to be refused today. The tests therefore make DuckDB refuse this one path for real
# (`refused_path`): what is under test (mark, skip, rebuild) is the one a future refusal
# would meet.
POISON_FILTER = {
    "conjunction": "and",
    "clauses": [{"property": "*", "operator": "eq", "value": 1}],
}
# An empty member name, which every DuckDB version refuses to bind ("JSON path error").
_REFUSED = '$.""'
_HOOK = f"""\
from aggregator.store.metering import meter_sql

_compile = meter_sql.json_path
meter_sql.json_path = lambda keys: {_REFUSED!r} if keys == ("*",) else _compile(keys)
"""


@pytest.fixture
def refused_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The poisoned meter's path compiles to one DuckDB refuses, in this process and in the
    processes it starts (a `sitecustomize` on their PYTHONPATH)."""
    compile_path = meter_sql.json_path
    monkeypatch.setattr(
        meter_sql, "json_path", lambda keys: _REFUSED if keys == ("*",) else compile_path(keys)
    )
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    paths = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def _events(n: int) -> list[Event]:
    return [
        Event(
            name="e",
            timestamp_us=now_us(),
            customer_id=None,
            external_customer_id="c",
            external_id=None,
            parent_id=None,
            external_member_id=None,
            metadata={"tokens": 2},
            cost_amount=None,
        )
        for _ in range(n)
    ]


def _ingest(store: Store, org: str, n: int) -> IngestJob:
    return IngestJob(org, to_table(_events(n)), now_us())


async def _meter(store: Store, org: str, meter_filter: dict[str, object]) -> str:
    data = MeterCreate.model_validate(
        {"name": "m-good", "filter": EVERYTHING, "aggregation": TOKENS}
    )
    meter = await store.write(create_job(org, data, now_us(), meter_id=str(uuid.uuid4())))
    if meter_filter is not EVERYTHING:
        # Planted as stored by an earlier version: the API refuses it today.
        await store.write(
            lambda tx: tx.con.execute(
                "UPDATE meters SET filter = ? WHERE id = ?::UUID",
                [orjson.dumps(meter_filter).decode(), meter.id],
            )
        )
    return str(meter.id)


async def _total(store: Store, meter_id: str) -> float:
    rows = await store.read(
        lambda con: con.execute(
            "SELECT coalesce(sum(total), 0) FROM all_rollups WHERE meter_id = ?::UUID", [meter_id]
        ).fetchall()
    )
    return float(rows[0][0])


async def _stored(store: Store) -> int:
    rows = await store.read(lambda con: con.execute("SELECT count(*) FROM events").fetchall())
    return int(rows[0][0])


@pytest.mark.usefixtures("refused_path")
@pytest.mark.parametrize("grouped", [False, True])
def test_a_poisoned_meter_is_marked_failed_and_the_batch_commits(
    tmp_path: Path, grouped: bool
) -> None:
    asyncio.run(_poisoned(tmp_path, grouped))


async def _poisoned(tmp_path: Path, grouped: bool) -> None:
    async with Store(tmp_path / "db.duckdb") as store:
        good_a = await _meter(store, ORG_A, EVERYTHING)
        poison = await _meter(store, ORG_A, POISON_FILTER)
        good_b = await _meter(store, ORG_B, EVERYTHING)
        jobs = [_ingest(store, ORG_A, 3), _ingest(store, ORG_B, 4)]
        if grouped:
            gate = threading.Event()
            held = store.write(lambda tx: gate.wait(10))
            pending = [asyncio.ensure_future(store.write(job)) for job in jobs]
            await asyncio.sleep(0)
            gate.set()
            await held
            results = await asyncio.gather(*pending)
        else:
            results = [await store.write(job) for job in jobs]
        assert [r.inserted for r in results] == [3, 4]
        assert await _stored(store) == 7
        assert await _total(store, good_a) == 6
        assert await _total(store, good_b) == 8
        failed = await store.read(get_meter, ORG_A, poison)
        assert failed is not None
        assert failed.failure is not None
        assert "json path" in failed.failure.lower()
        assert failed.failed_at_us is not None

        # Skipped from now on without another failure; the others keep counting.
        await store.write(_ingest(store, ORG_A, 1))
        assert await _total(store, good_a) == 8
        assert await _total(store, poison) == 0

        # Redefined: a new version, no failure; its backfill rebuilds it from every event.
        fix = MeterUpdate.model_validate({"filter": EVERYTHING})
        fixed = await store.write(update_job(ORG_A, poison, fix, now_us()))
        assert fixed.failure is None
        assert fixed.backfilling
        while (await store.write(backfill_step_job(poison, fixed.version, 2))) not in (
            None,
            (fixed.backfill_target, fixed.backfill_target),
        ):
            pass
        assert await _total(store, poison) == 8


@pytest.mark.usefixtures("refused_path")
def test_a_failed_backfill_marks_the_meter_and_stops(tmp_path: Path) -> None:
    asyncio.run(_failed_backfill(tmp_path))


async def _failed_backfill(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.duckdb") as store:
        await store.write(_ingest(store, ORG_A, 5))
        data = MeterCreate.model_validate(
            {"name": "m-late", "filter": EVERYTHING, "aggregation": TOKENS}
        )
        meter = await store.write(create_job(ORG_A, data, now_us(), meter_id=str(uuid.uuid4())))
        await store.write(
            lambda tx: tx.con.execute(
                "UPDATE meters SET filter = ? WHERE id = ?::UUID",
                [orjson.dumps(POISON_FILTER).decode(), meter.id],
            )
        )
        assert await store.write(backfill_step_job(meter.id, meter.version, 100)) is None
        failed = await store.read(get_meter, ORG_A, meter.id)
        assert failed is not None and failed.failure is not None
        assert not failed.backfilling


def _previous_main_data_dir(
    data_dir: Path, meters: list[tuple[str, str, dict[str, object]]]
) -> None:
    """A data dir as the previous main left it: schema step 6, and meters stored then (a
    poisoned one among them, which that main accepted)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(data_dir / "meterline.duckdb"))
    assert migrate(con, until=6) == 6
    for meter_id, org, meter_filter in meters:
        con.execute(
            "INSERT INTO meters (id, organization_id, name, unit, filter, aggregation, metadata,"
            " created_at, backfill_target) VALUES (?, ?, 'tokens', 'scalar', ?, ?, '{}', now(), 0)",
            [meter_id, org, orjson.dumps(meter_filter).decode(), orjson.dumps(TOKENS).decode()],
        )
    con.close()


@pytest.mark.processes
@pytest.mark.usefixtures("refused_path")
def test_kafka_core_applies_every_organization_past_a_poisoned_meter(tmp_path: Path) -> None:
    registry = TokenRegistry(tmp_path)
    org_a, org_b = registry.organization("a").id, registry.organization("b").id
    registry.close()
    poison, good_a, good_b = (str(uuid.uuid4()) for _ in range(3))
    _previous_main_data_dir(
        tmp_path,
        [(poison, org_a, POISON_FILTER), (good_a, org_a, EVERYTHING), (good_b, org_b, EVERYTHING)],
    )
    token_a, token_b = new_org_token(tmp_path, "a"), new_org_token(tmp_path, "b")
    with Pipeline(tmp_path, partitions=1) as pipeline:
        edge = pipeline.edges[0]
        sent = {token_a: 0, token_b: 0}
        for i in range(6):
            token = (token_a, token_b)[i % 2]
            events = [
                {"name": "use", "external_customer_id": "c", "metadata": {"tokens": 3}}
                for _ in range(50)
            ]
            with edge.client(token) as client:
                assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
            sent[token] += 50
        assert pipeline.core is not None
        core = pipeline.core
        for token, meter_id in ((token_a, good_a), (token_b, good_b)):
            with core.client(token) as client:
                expected = 3 * sent[token]
                wait_for(
                    "the good meters to count every event",
                    lambda c=client, m=meter_id, e=expected: _total_of(c, m) == e,
                )
        with core.client(token_a) as client:
            failure = client.get(f"/v1/meters/{poison}").json()["failure"]
            assert failure is not None and "json path" in failure["reason"].lower()
            refused = client.get(f"/v1/meters/{poison}/quantities", params=_window())
            assert refused.status_code == 409, refused.text
            # Fixed: a new version, rebuilt by backfill from every stored event.
            fixed = client.patch(f"/v1/meters/{poison}", json={"filter": EVERYTHING})
            assert fixed.status_code == 200 and fixed.json()["failure"] is None
            wait_for(
                "the fixed meter's backfill",
                lambda: _total_of(client, poison) == 3 * sent[token_a],
            )


def _window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "start_timestamp": (now - timedelta(days=1)).isoformat(),
        "end_timestamp": (now + timedelta(days=1)).isoformat(),
        "interval": "day",
    }


def _total_of(client: httpx.Client, meter_id: str) -> float:
    response = client.get(f"/v1/meters/{meter_id}/quantities", params=_window())
    return float(response.json()["total"]) if response.status_code == 200 else -1.0
