"""The lakehouse export (issue 65), in process: a core (a real DuckDB file) exporting to a real
Delta Lake table in a folder, read back by engines meterline did not write: `deltalake`'s own
reader, DuckDB over the Arrow it reads, and ClickHouse's engine (`chdb`). Each answers the same
per-customer totals as meterline's API; a voided event leaves the table, an amended one is
replaced by its new version; an exporter started again goes on from the table's own record,
and a second writer for the same id is refused."""

from __future__ import annotations

import asyncio
import importlib.util
from datetime import date
from pathlib import Path
from typing import Any

import chdb
import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from aggregator import cli
from aggregator.core_metrics import export as export_metrics
from aggregator.errors import UsageError
from aggregator.export.exporter import Exporter, ancestors
from aggregator.export.table import EventsTable, Stale, table_uri
from aggregator.serving.command import settings_of
from aggregator.settings import ExportSettings
from aggregator.store import export_reads
from aggregator.store.tables.shard_splits import Split
from tests.aggregator.export.lake import read
from tests.inprocess import InProcessCore

DAYS = ("2026-03-01", "2026-03-02")
CUSTOMERS = ("c0", "c1", "c2")
WINDOW = {
    "start_timestamp": "2026-03-01T00:00:00Z",
    "end_timestamp": "2026-03-31T23:59:59Z",
    "interval": "month",
}


def _event(n: int) -> dict[str, Any]:
    tokens = 10 + n
    return {
        "name": "llm.call",
        "external_customer_id": CUSTOMERS[n % len(CUSTOMERS)],
        "external_id": f"call-{n}",
        "timestamp": f"{DAYS[n % 2]}T{n % 24:02d}:00:00Z",
        "metadata": {
            "route": "/chat",
            "_llm": {
                "vendor": "openai",
                "model": "gpt-4o" if n % 3 else "gpt-4o-mini",
                "input_tokens": tokens - 4,
                "output_tokens": 4,
                "total_tokens": tokens,
            },
            "_cost": {"amount": f"0.{n:02d}", "currency": "usd"},
        },
    }


_METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "_llm.total_tokens"},
}


def _usage(target: Path, meter_id: str | None = None) -> dict[tuple[str, str], float]:
    """(customer, day) -> quantity in the usage table, of the meter named tokens (or `meter_id`)."""
    where = f"meter_id = '{meter_id}'" if meter_id else "meter_name = 'tokens'"
    rows = read(
        target,
        f"SELECT external_customer_id, day, quantity FROM events WHERE {where}",
        "customer_meter_usage",
    )
    return {
        (r["external_customer_id"], r["day"].isoformat()): r["quantity"] for r in rows.to_pylist()
    }


def _api_daily(core: InProcessCore, meter_id: str) -> dict[tuple[str, str], float]:
    """(customer, day) -> the meter's quantity that day, as the API answers it (days with
    usage only)."""
    found = {}
    for customer in CUSTOMERS:
        params = {**WINDOW, "interval": "day", "external_customer_id": customer}
        answer = _call(core, "GET", f"/v1/meters/{meter_id}/quantities", params=params)
        for q in answer["quantities"]:
            if q["quantity"]:
                found[(customer, q["timestamp"][:10])] = q["quantity"]
    return found


def _call(core: InProcessCore, method: str, path: str, **kwargs: Any) -> Any:
    answer = core.request(method, path, **kwargs)
    assert answer.status_code < 300, answer.text
    return answer.json() if answer.content else None


def _api_totals(core: InProcessCore, meter_id: str) -> dict[str, float]:
    found = {}
    for customer in CUSTOMERS:
        params = {**WINDOW, "external_customer_id": customer}
        found[customer] = _call(core, "GET", f"/v1/meters/{meter_id}/quantities", params=params)[
            "total"
        ]
    return found


def _table_totals(target: Path) -> dict[str, dict[str, float]]:
    """Per customer, the sum of `llm_total_tokens` of the user events, as each engine reads
    the table: its own (`deltalake`'s), and DuckDB and chdb over the Arrow it reads."""
    sql = (
        "SELECT external_customer_id, CAST(sum(llm_total_tokens) AS DOUBLE) FROM events"
        " WHERE source = 'user' GROUP BY external_customer_id"
    )
    found = {"deltalake": read(target, sql)}
    events = read(target)  # chdb reads the Python variable it names
    with duckdb.connect() as con:
        con.register("events", events)
        found["duckdb"] = con.sql(sql).to_arrow_table()
    found["chdb"] = chdb.query(sql.replace("FROM events", "FROM Python(events)"), "ArrowTable")
    return {
        engine: dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))
        for engine, t in found.items()
    }


def _exported(core: InProcessCore, exporter: Exporter) -> None:
    """Run the exporter's steps until one does nothing."""

    async def until_done() -> None:
        while await exporter.step():
            pass

    core.run(until_done())


def _settings(target: Path) -> ExportSettings:
    return ExportSettings(str(target), max_events=7)  # several commits for a few events


def test_the_table_holds_each_current_event_once_as_every_engine_reads_it(
    tmp_path: Path,
) -> None:
    target = tmp_path / "lake"
    with InProcessCore(tmp_path / "data", export_to=target) as core:
        meter = _call(core, "POST", "/v1/meters/", json=_METER)
        _call(core, "POST", "/v1/events/ingest", json={"events": [_event(n) for n in range(30)]})
        core.settle()
        exporter = Exporter(core.store, _settings(target))
        _exported(core, exporter)
        assert exporter.commits == 5  # 30 events, 7 per commit
        status = _call(core, "GET", "/v1/export/")  # the route's own exporter has not run
        organization = _call(core, "GET", "/v1/organizations/")["items"][0]["id"]
        assert status == {
            "format": "delta",
            "table": table_uri(str(target)),
            "partition": f"organization_id={organization}",
            "exporting": True,
            "lag_seconds": status["lag_seconds"],
            "last_commit_at": None,
            "failing": False,
            "last_error": None,
        }
        assert status["lag_seconds"] > 0
        table = DeltaTable(table_uri(str(target)))
        assert table.metadata().partition_columns == ["organization_id", "day"]
        rows = read(target)
        assert rows.num_rows == 30
        assert sorted(rows.column("external_id").to_pylist()) == sorted(
            f"call-{n}" for n in range(30)
        )
        first = rows.filter(pa.compute.equal(rows.column("external_id"), "call-4")).to_pylist()[0]
        assert (first["llm_model"], first["llm_input_tokens"], first["llm_total_tokens"]) == (
            "gpt-4o",
            10,
            14,
        )
        assert str(first["cost_amount"]).rstrip("0") == "0.04"
        assert first["day"].isoformat() == DAYS[0]
        totals = _table_totals(target)
        api = _api_totals(core, meter["id"])
        assert all(found == api for found in totals.values()), (totals, api)
        assert core.run(exporter.usage.refresh()) == 2  # the organization's two days
        assert _usage(target) == _api_daily(core, meter["id"])

        # A void and an amendment: the table follows.
        listed = _call(core, "GET", "/v1/events/", params={"limit": 100})["items"]
        ids = {e["metadata"]["_llm"]["total_tokens"]: e["id"] for e in listed}
        _call(core, "POST", "/v1/events/void", json={"ids": [ids[10]], "reason": "dup"})
        amended = _event(1)["metadata"]
        amended["_llm"]["total_tokens"] = 1000
        _call(core, "PATCH", f"/v1/events/{ids[11]}", json={"metadata": amended})
        core.voids_done()
        core.settle()
        _exported(core, exporter)
        rows = read(target).to_pylist()
        # The void and the amendment are events too (system ones), exported as such.
        assert sorted(r["name"] for r in rows if r["source"] == "system") == [
            "event.amended",
            "event.voided",
        ]
        kept = {r["id"]: r for r in rows if r["source"] == "user"}
        assert len(kept) == 29
        assert ids[10] not in kept and ids[11] not in kept
        new = [r for r in kept.values() if r["external_id"] == "call-1"]
        assert [(r["version"], r["llm_total_tokens"]) for r in new] == [(2, 1000)]
        totals = _table_totals(target)
        api = _api_totals(core, meter["id"])
        assert all(found == api for found in totals.values()), (totals, api)
        # The usage of the days the void and the amendment changed (and today's: their own
        # system events), and of every day once a meter is made.
        assert core.run(exporter.usage.refresh()) == 3
        assert _usage(target) == _api_daily(core, meter["id"])
        count = _call(core, "POST", "/v1/meters/", json={**_METER, "name": "calls"})
        core.settle()
        assert core.run(exporter.usage.refresh()) == 3
        assert _usage(target, count["id"]) == _api_daily(core, count["id"])
        assert _usage(target) == _api_daily(core, meter["id"])

        # Started again, an exporter goes on from the table's record: nothing twice.
        again = Exporter(core.store, _settings(target))
        _exported(core, again)
        assert again.exported == 0 and again.position == exporter.position
        more = [_event(n) for n in range(30, 33)]
        _call(core, "POST", "/v1/events/ingest", json={"events": more})
        core.settle()
        _exported(core, again)
        assert again.exported == 3
        assert read(target).num_rows == 34
        assert core.run(again.lag())[0] == 0


def test_a_second_writer_for_the_same_id_is_refused(tmp_path: Path) -> None:
    rows = pa.Table.from_pylist(
        [
            {
                "id": "00000000-0000-4000-8000-000000000001",
                "organization_id": "o",
                "day": date.today(),
            }
        ],
        schema=export_reads.SCHEMA,
    )
    first, second = (EventsTable(str(tmp_path), "meterline/0/1") for _ in range(2))
    # Both start from no table: the first to read makes it, empty; both read position 0.
    assert first.position() == second.position() == 0
    first.append(rows, 1)
    with pytest.raises(Stale):  # both from 0: the second's batch would be the first's
        second.append(rows, 1)
    assert first.position() == second.position() == 1
    first.append(rows, 2)
    with pytest.raises(Stale):  # it read position 1: its batch may be the first's
        second.append(rows, 2)
    assert second.position() == 2
    assert read(tmp_path).num_rows == 2
    # Another shard's exporter appends beside them.
    other = EventsTable(str(tmp_path), "meterline/1/2")
    assert other.position() == 0
    other.append(rows, 5)
    assert (first.position(), other.position()) == (2, 5)


def test_no_table_yet_is_position_zero_and_an_empty_table(tmp_path: Path) -> None:
    table = EventsTable(str(tmp_path / "nothing"), "meterline/0/1")
    assert table.position() == 0
    # Made, so that the first append too is based on a snapshot.
    assert DeltaTable(table_uri(str(tmp_path / "nothing"))).schema().to_arrow() is not None
    assert table.holding(["00000000-0000-4000-8000-000000000001"]) == []
    assert asyncio.run(asyncio.to_thread(table.delete, [])) == 0


def test_a_shard_a_split_made_goes_on_from_its_old_shards_position(tmp_path: Path) -> None:
    def split(from_count: int, to_count: int, origin: bool = True) -> Split:
        return Split(from_count, to_count, 4, {}, origin)

    # 1 shard split into 2, then into 4: shard 3/4's data dir came from 1/2's, from 0/1's.
    made = [split(1, 2), split(2, 4)]
    assert ancestors("meterline/3/4", made) == ["meterline/1/2", "meterline/0/1"]
    assert ancestors("meterline/0/1", [split(1, 2, origin=False)]) == []  # the old shard's own
    assert ancestors("custom-id", made) == []
    rows = pa.Table.from_pylist(
        [
            {
                "id": "00000000-0000-4000-8000-000000000002",
                "organization_id": "o",
                "day": date.today(),
            }
        ],
        schema=export_reads.SCHEMA,
    )
    old = EventsTable(str(tmp_path), "meterline/0/1")
    old.position()
    old.append(rows, 10)
    new = EventsTable(str(tmp_path), "meterline/3/4")
    assert new.position(ancestors("meterline/3/4", made)) == 10
    new.append(rows, 15)
    assert new.position(ancestors("meterline/3/4", made)) == 15  # its own, once it has one
    assert EventsTable(str(tmp_path), "meterline/2/4").position(["meterline/0/2"]) == 0


def test_a_target_that_cannot_be_written_fails_visibly_and_is_retried(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    settings = ExportSettings(str(blocked / "lake"), idle_seconds=0.01, retry_seconds=0.05)
    with InProcessCore(tmp_path / "data") as core:
        _call(core, "POST", "/v1/events/ingest", json={"events": [_event(0)]})
        core.settle()

        async def failing() -> tuple[str | None, int]:
            async with Exporter(core.store, settings) as exporter:
                for _ in range(200):
                    if exporter.last_error is not None:
                        break
                    await asyncio.sleep(0.01)
                lines = await export_metrics(exporter)()
                return exporter.last_error, lines.count("meterline_export_failing 1")

        error, failing_lines = core.run(failing())
    assert error is not None and failing_lines == 1
    blocked.unlink()  # the target writable again: the same settings export
    blocked.mkdir()
    with InProcessCore(tmp_path / "data") as core:
        exporter = Exporter(core.store, settings)
        _exported(core, exporter)
        assert exporter.exported == 1


def test_export_to_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deltalake" else found(name)
    )
    with pytest.raises(UsageError, match=r"pip install 'meterline\[export\]'"):
        settings_of(cli.parse(["up", "--export-to", "lake"]))
