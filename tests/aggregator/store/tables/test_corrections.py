"""Corrections in the store (`store.tables.corrections`): a data dir of the previous main (schema
step 29: no corrections) opens and takes a void; the `events` view joins `voided_events` only
with the files that may hold a voided event, and a void rolled back leaves the view and the
voided set as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from aggregator.store.tables.correction_jobs import _at_most
from meters.errors import ValidationFailed
from tests.aggregator.store.schema_before import before_corrections
from tests.inprocess import InProcessCore

WINDOW = {
    "start_timestamp": "2026-01-01T00:00:00Z",
    "end_timestamp": "2026-02-01T00:00:00Z",
    "interval": "month",
}


def _ingest(core: InProcessCore, *keys: str) -> None:
    events = [
        {
            "name": "use",
            "external_customer_id": "ada",
            "external_id": key,
            "timestamp": "2026-01-10T00:00:00Z",
            "metadata": {"tokens": 2},
        }
        for key in keys
    ]
    answer = core.request("POST", "/v1/events/ingest", json={"events": events})
    assert answer.status_code == 200, answer.text
    core.settle()  # stored: each request's events a file of their own


def _total(core: InProcessCore, meter: str) -> Any:
    answer = core.request("GET", f"/v1/meters/{meter}/quantities", params=WINDOW)
    assert answer.status_code == 200, answer.text
    return answer.json()["total"]


def _meter(core: InProcessCore) -> str:
    body = {
        "name": "tokens",
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "sum", "property": "tokens"},
    }
    answer = core.request("POST", "/v1/meters/", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_a_data_dir_of_the_previous_main_opens_and_takes_a_void(tmp_path: Path) -> None:
    with InProcessCore(tmp_path) as core:
        meter = _meter(core)
        _ingest(core, "a", "b", "c")
        assert _total(core, meter) == 6
    con = duckdb.connect(str(tmp_path / "meterline.duckdb"))
    before_corrections(con)
    con.close()
    with InProcessCore(tmp_path) as core:
        assert _total(core, meter) == 6
        voided = core.request(
            "POST", "/v1/events/void", json={"external_ids": ["b"], "reason": "x"}
        )
        assert voided.json()["voided"] == 1, voided.text
        assert _total(core, meter) == 4
        listed = core.request("GET", "/v1/events/", params={"voided": "true"}).json()["items"]
        assert sorted(e["void_reason"] or "" for e in listed if e["source"] == "user") == [
            "",
            "",
            "x",
        ]


def _view(core: InProcessCore) -> str:
    def read(con: duckdb.DuckDBPyConnection) -> str:
        rows = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'events'")
        return str(rows.fetchall()[0][0])

    return core.run(core.store.read(read))


def test_only_files_that_may_hold_a_voided_event_are_joined(tmp_path: Path) -> None:
    with InProcessCore(tmp_path) as core:
        meter = _meter(core)
        _ingest(core, "a")
        _ingest(core, "b")
        assert "ANTI JOIN" not in _view(core)  # nothing voided: no join at all
        core.request("POST", "/v1/events/void", json={"external_ids": ["a"], "reason": "x"})
        _ingest(core, "c")
        view = _view(core)
        joined = view[view.index("FROM ((SELECT") :]
        files = sorted(f for f in view.split("'") if f.endswith(".parquet"))
        # a's, b's, the void's system event's, c's, in the order written
        assert len(files) == 4
        assert [f in joined for f in files] == [True, False, False, False]
        assert _total(core, meter) == 4
    with InProcessCore(tmp_path) as core:  # the same after a restart (seqs from the footers)
        assert _view(core) == view
        assert _total(core, meter) == 4


def test_a_filter_matching_more_than_the_limit_is_refused_naming_it(tmp_path: Path) -> None:
    """The bound itself (`MAX_FILTERED`, a million) is too many events to store here: the check
    is held to a bound of two on three events."""
    with InProcessCore(tmp_path) as core:
        _ingest(core, "a", "b", "c")
        org = core.request("GET", "/v1/events/").json()["items"][0]["organization_id"]

        def check(most: int) -> None:
            core.run(core.store.read(_at_most, org, "external_id IS NOT NULL", [], most))

        check(3)
        with pytest.raises(ValidationFailed) as refused:
            check(2)
        assert [e.loc for e in refused.value.errors] == [("body", "filter")]
