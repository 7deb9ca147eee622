"""A data dir of the version before every row was in a file: its relations' rows kept in their
base tables (rows from before segments, system events, correction rewrites, lifted rollups).
Opened, the store moves them into files once: the digest is the same, the base tables empty,
and a crash between writing such a file and listing it loses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from aggregator.store.base.rows import registered, transaction
from aggregator.store.engine.segments import RELATIONS, Segments, folder_of
from tests.inprocess import EVERY_RELATION_METERS, InProcessCore


def _events(first: int, n: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "use",
            "external_customer_id": f"c{i % 3}",
            "external_id": f"e{i}",
            "timestamp": f"2026-01-01T0{i % 5}:{i % 60:02d}:00Z",
            "metadata": {"n": i, "model": "ab"[i % 2]},
        }
        for i in range(first, first + n)
    ]


def _written(path: Path) -> dict[str, Any]:
    """A data dir with every kind of row: events, a credit's system event, a void's markers
    and rewrites, an amendment's new version; its digest."""
    with InProcessCore(path) as core:
        meter_ids = core.create_meters(EVERY_RELATION_METERS)
        for first in (0, 20):
            ingested = core.request(
                "POST", "/v1/events/ingest", json={"events": _events(first, 20)}
            )
            assert ingested.status_code == 200, ingested.text
            core.settle()
        customer = core.request(
            "POST", "/v1/customers/", json={"email": "c0@example.com", "external_id": "c0"}
        )
        assert customer.status_code == 201, customer.text
        credit = {
            "customer_id": customer.json()["id"],
            "meter_id": meter_ids[1],
            "units": 5,
            "external_id": "k",
        }
        assert core.request("POST", "/v1/meter-credits/", json=credit).status_code == 201
        voided = core.request(
            "POST", "/v1/events/void", json={"external_ids": ["e3"], "reason": "x"}
        )
        assert voided.status_code == 200, voided.text
        listed = core.request("GET", "/v1/events/", params={"external_customer_id": "c1"}).json()
        one = next(e["id"] for e in listed["items"] if e["metadata"]["n"] == 4)
        amended = core.request(
            "PATCH", f"/v1/events/{one}", json={"metadata": {"n": 400, "model": "a"}}
        )
        assert amended.status_code == 200, amended.text
        core.settle()
        digest: dict[str, Any] = core.request("GET", "/v1/cluster/digest").json()
        return digest


def _into_base_tables(database: Path) -> int:
    """The rows the previous version wrote to base tables moved there out of the files: every
    rollup, voided event marker, and system event (its ingested and amended events stayed in
    files; a base table keeps one version of an external id). How many rows."""
    con = duckdb.connect(str(database))
    segments = Segments(folder_of(database))
    moved = 0
    try:
        segments.open(con)
        for spec in RELATIONS.values():
            where = "source = 'system'" if spec.name == "events" else "TRUE"
            change, rows = segments.extract(con, spec.name, where, [])
            if rows is None:
                continue
            with transaction(con), registered(con, "_rows", rows):
                segments.commit(con, change)
                con.execute(f"INSERT INTO {spec.base} SELECT * FROM _rows")
            segments.committed(change)
            moved += rows.num_rows
    finally:
        con.close()
    return moved


def _base_rows(database: Path) -> int:
    con = duckdb.connect(str(database))
    try:
        return sum(
            int(con.execute(f"SELECT count(*) FROM {spec.base}").fetchall()[0][0])
            for spec in RELATIONS.values()
        )
    finally:
        con.close()


def _digest(path: Path) -> dict[str, Any]:
    with InProcessCore(path) as core:
        found: dict[str, Any] = core.request("GET", "/v1/cluster/digest").json()
        return found


def test_rows_in_base_tables_move_into_files_and_read_the_same(tmp_path: Path) -> None:
    before = _written(tmp_path)
    database = tmp_path / "meterline.duckdb"
    assert _base_rows(database) == 0  # this version writes every row to a file
    assert _into_base_tables(database) > 0
    assert _base_rows(database) > 0
    assert _digest(tmp_path)["tables"] == before["tables"]
    assert _base_rows(database) == 0
    assert _digest(tmp_path)["tables"] == before["tables"]  # and again, from the files alone


def test_a_crash_between_the_file_and_its_listing_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _written(tmp_path)
    database = tmp_path / "meterline.duckdb"
    held = _into_base_tables(database)

    def crash(self: Segments, con: Any, change: Any, whole: Any = None) -> None:
        raise OSError("killed before the listing")

    with monkeypatch.context() as patched:
        patched.setattr(Segments, "commit", crash)
        with pytest.raises(OSError, match="killed before the listing"), InProcessCore(tmp_path):
            pass
    assert _base_rows(database) == held  # every row where it was
    assert _digest(tmp_path)["tables"] == before["tables"]
    assert _base_rows(database) == 0
