"""`meterline export --to --from --until` (issue 65): a range's current events, once, from a
stopped data dir. Run again after a correction, the range is replaced, not appended to; the
continuous export's table, a data dir in use and an empty range are refused with what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.export.exporter import Exporter
from aggregator.settings import ExportSettings
from tests.aggregator.export.lake import read
from tests.inprocess import InProcessCore, run_cli

# A process holding a database as a server does (DuckDB's lock), until its stdin closes.
_HOLD = (
    "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
    " sys.stdin.read()"
)


def _events() -> list[dict[str, Any]]:
    return [
        {
            "name": "call",
            "external_customer_id": f"c{n % 2}",
            "external_id": f"e{n}",
            "timestamp": f"2026-03-0{1 + n % 3}T10:00:00Z",
            "metadata": {"tokens": n},
        }
        for n in range(12)
    ]


def _export(data: Path, lake: Path, *range_: str) -> tuple[int, str, str]:
    done = run_cli("export", "--to", str(lake), *range_, "--data-dir", str(data))
    return done.returncode, done.stdout, done.stderr


def _user_ids(lake: Path) -> list[str]:
    rows = read(lake, "SELECT external_id FROM events WHERE source = 'user'")
    return sorted(rows.column("external_id").to_pylist())


def _usage(lake: Path) -> dict[tuple[str, str], float]:
    """(customer, day) -> tokens in the usage table."""
    sql = "SELECT external_customer_id, day, quantity FROM events"
    rows = read(lake, sql, "customer_meter_usage").to_pylist()
    return {(r["external_customer_id"], r["day"].isoformat()): r["quantity"] for r in rows}


def test_a_range_is_exported_once_and_replaced_when_run_again(tmp_path: Path) -> None:
    data, lake = tmp_path / "data", tmp_path / "lake"
    with InProcessCore(data) as core:
        meter = {
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
        assert core.request("POST", "/v1/meters/", json=meter).is_success
        assert core.request("POST", "/v1/events/ingest", json={"events": _events()}).is_success
        core.settle()
    days = ("--from", "2026-03-01", "--until", "2026-03-03")  # the 1st and the 2nd
    code, out, err = _export(data, lake, *days)
    assert (code, err) == (0, ""), err
    assert out.startswith("exported 8 events of [2026-03-01T00:00:00Z, 2026-03-03T00:00:00Z)")
    assert _user_ids(lake) == sorted(f"e{n}" for n in range(12) if n % 3 != 2)
    # Tokens n on day 1 + n % 3, of customer c(n % 2): each whole day of the range.
    assert _usage(lake) == {
        ("c0", "2026-03-01"): 0 + 6,
        ("c1", "2026-03-01"): 3 + 9,
        ("c1", "2026-03-02"): 1 + 7,
        ("c0", "2026-03-02"): 4 + 10,
    }

    with InProcessCore(data) as core:  # a correction, then the same range again
        listed = core.request("GET", "/v1/events/", params={"limit": 100}).json()["items"]
        voided = next(e["id"] for e in listed if e["metadata"]["tokens"] == 6)
        body = {"ids": [voided], "reason": "dup"}
        assert core.request("POST", "/v1/events/void", json=body).is_success
        core.voids_done()
    code, out, _ = _export(data, lake, *days)
    assert code == 0 and out.startswith("exported 7 events"), out
    assert _user_ids(lake) == sorted(f"e{n}" for n in range(12) if n % 3 != 2 and n != 6)
    assert _usage(lake)[("c0", "2026-03-01")] == 0  # e0's 0 tokens, e6 voided
    code, out, _ = _export(data, lake, "--from", "2026-03-03", "--until", "2026-03-04")
    assert code == 0 and out.startswith("exported 4 events"), out
    assert len(_user_ids(lake)) == 11
    assert len(_usage(lake)) == 6 and _usage(lake)[("c1", "2026-03-03")] == 5 + 11


def test_what_it_refuses(tmp_path: Path) -> None:
    data, lake = tmp_path / "data", tmp_path / "lake"
    days = ("--from", "2026-03-01", "--until", "2026-03-03")
    with InProcessCore(data) as core:
        assert core.request("POST", "/v1/events/ingest", json={"events": _events()}).is_success
        core.settle()
        exporter = Exporter(core.store, ExportSettings(str(lake)))
        assert core.run(exporter.step())
    code, _, err = _export(data, lake, *days)
    assert code == 2 and "was not made by one-off exports" in err, err
    code, _, err = _export(
        data, tmp_path / "other", "--from", "2026-03-02", "--until", "2026-03-01"
    )
    assert code == 2 and "--until must come after --from" in err, err
    code, _, err = _export(tmp_path / "nothing", lake, *days)
    assert code == 2 and "holds no meterline database" in err, err


@pytest.mark.processes
def test_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with InProcessCore(data):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(data / "meterline.duckdb")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        code, _, err = _export(data, tmp_path / "lake", "--from", "today", "--until", "now")
        assert code == 2 and "is in use (a server on it?)" in err, err
    finally:
        holder.communicate("")
