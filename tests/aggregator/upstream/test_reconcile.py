"""`meterline reconcile` (the command, run in the test's process) against two meterlines: a
batch the upstream acknowledged but never stored (a planted gap) is found per customer and
meter, repaired through the edge's forwarder, and the next run reports zero drift."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.deadline import wait_for
from tests.faults import ROLLUPS_NOW, forwarded, forwarding
from tests.inprocess import run_cli
from tests.processes import Server

pytestmark = pytest.mark.slow

ALL = {"conjunction": "and", "clauses": []}


def _reconcile(
    tmp_path: Path, edge: Server, central: Server, *extra: str
) -> tuple[int, dict[str, Any], str]:
    report = tmp_path / "report.json"
    now = datetime.now(UTC)
    done = run_cli(
        "reconcile",
        *("--from", (now - timedelta(days=1)).isoformat()),
        *("--to", (now + timedelta(minutes=1)).isoformat()),
        *("--url", edge.url, "--token", edge.token or ""),
        *("--upstream-url", central.url, "--upstream-token", central.token or ""),
        *("--report", str(report)),
        *extra,
    )
    return done.returncode, orjson.loads(report.read_bytes()), done.stderr


def test_planted_gap_is_found_repaired_and_gone(tmp_path: Path) -> None:
    with (
        forwarding(tmp_path, ["pass", "lie"], "--upstream-batch-events", "10") as (
            central,
            _,
            edge,
        ),
        edge.client() as client,
        central.client() as upstream,
    ):
        tokens = {"name": "tokens", "filter": ALL}
        tokens["aggregation"] = {"func": "sum", "property": "tokens"}
        for api in (client, upstream):
            assert api.post("/v1/meters/", json=tokens).status_code == 201
        calls = {"name": "calls", "filter": ALL, "aggregation": {"func": "count"}}
        assert client.post("/v1/meters/", json=calls).status_code == 201
        start = datetime.now(UTC) - timedelta(hours=2)
        events = [
            {
                "name": "call",
                "external_customer_id": f"c{i % 4}",
                "timestamp": (start + timedelta(seconds=i)).isoformat(),
                "metadata": {"tokens": i},
                **({"external_id": f"e{i}"} if i % 5 else {}),  # some without
            }
            for i in range(30)
        ]
        assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
        wait_for(
            "the forwarder's backlog to empty",
            lambda: client.get("/v1/forwarder/").json()["backlog"] == 0,
        )

        code, before, stderr = _reconcile(tmp_path, edge, central)
        assert code == 1, stderr
        assert before["drift_found"] and before["missing_upstream"]["count"] == 10
        assert before["local"]["events"] == 30 and before["upstream"]["events"] == 20
        lost = {e["metadata"]["tokens"] for e in events[10:20]}
        drift = {(d["customer"], d["meter"]): d for d in before["drift"]}
        assert {c for c, _ in drift} == {"c0", "c1", "c2", "c3"}
        tokens_c1 = drift["c1", "tokens"]
        assert tokens_c1["difference"] == sum(t for t in lost if t % 4 == 1)
        assert any(not t["same"] for t in before["meter_totals"])
        assert "DRIFT" in stderr

        code, repaired, stderr = _reconcile(tmp_path, edge, central, "--repair")
        assert code == 1, stderr
        assert repaired["repair"] == {
            "requested": 10,
            "found": 10,
            "accepted": 10,
            "refused": 0,
        }
        code, after, stderr = _reconcile(tmp_path, edge, central)
        assert code == 0, stderr
        assert not after["drift"] and after["missing_upstream"]["count"] == 0
        assert after["upstream"]["events"] == 30 and after["extra_upstream"] == 0
        assert all(t["same"] for t in after["meter_totals"])
        # The repair used the external_ids the forwarder uses: sending all again
        # changes nothing upstream.
        again = client.post(
            "/v1/forwarder/resend",
            json={"event_ids": [e["id"] for e in _events(client)]},
        )
        assert again.json()["accepted"] == 30
        total = upstream.get("/v1/events/", params={"limit": 1}).json()["pagination"]
        assert total["total_count"] == 30


def _events(client: Any) -> list[dict[str, Any]]:
    return list(client.get("/v1/events/", params={"limit": 100}).json()["items"])


def test_rollup_mode_gap_is_repaired_with_difference_events(tmp_path: Path) -> None:
    with (
        forwarding(tmp_path, ["lie"], *ROLLUPS_NOW, "--upstream-batch-events", "2") as (
            central,
            _,
            edge,
        ),
        edge.client() as client,
        central.client() as upstream,
    ):
        units = {"conjunction": "and", "clauses": []}
        meter = {"name": "tokens", "filter": units}
        meter["aggregation"] = {"func": "sum", "property": "tokens"}
        assert client.post("/v1/meters/", json=meter).status_code == 201
        meter["aggregation"] = {"func": "sum", "property": "units"}  # rollup events
        assert upstream.post("/v1/meters/", json=meter).status_code == 201
        start = datetime.now(UTC) - timedelta(hours=5)
        events = [
            {
                "name": "call",
                "external_customer_id": f"c{i % 2}",
                "external_id": f"r{i}",
                "timestamp": (start + timedelta(minutes=20 * i)).isoformat(),
                "metadata": {"tokens": 10 + i},
            }
            for i in range(8)
        ]
        assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200

        wait_for("the forwarder to send every rollup upstream", lambda: forwarded(client))
        args = ("--mode", "rollup")
        code, before, stderr = _reconcile(tmp_path, edge, central, *args)
        assert code == 1, stderr
        assert len(before["drift"]) == 2  # the first request's two periods were lost
        assert all(d["upstream"] == 0 for d in before["drift"])
        code, repaired, stderr = _reconcile(tmp_path, edge, central, *args, "--repair")
        assert repaired["repair"]["accepted"] == 2, stderr
        code, after, stderr = _reconcile(tmp_path, edge, central, *args)
        assert code == 0 and not after["drift"], stderr
        assert all(t["same"] for t in after["meter_totals"])
