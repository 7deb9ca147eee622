"""Rollup-mode forwarding to a second real meterline: one event per count/sum meter, customer and
period, whose units add up upstream to the local totals, including an event that arrives after
its period was forwarded (a second revision), through a stall that makes the edge re-send."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from tests.deadline import wait_for
from tests.faults import ROLLUPS_NOW, forwarded, forwarding
from tests.processes import Server

pytestmark = pytest.mark.slow

ALL = {"conjunction": "and", "clauses": []}


def _rollup_events(central: Server) -> list[tuple[str, str, dict[str, Any]]]:
    with duckdb.connect(str(central.data_dir / "meterline.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT external_id, external_customer_id, metadata FROM events"
        ).fetchall()
    return [(r[0], r[1], orjson.loads(r[2])) for r in rows]


def test_rollups_add_up_upstream_once_each(tmp_path: Path) -> None:
    with (
        forwarding(
            tmp_path,
            ["pass", "stall"],
            *ROLLUPS_NOW,
            *("--upstream-rollup-minutes", "15", "--upstream-batch-events", "4"),
            *("--upstream-timeout", "1"),
        ) as (central, _, edge),
        edge.client() as client,
    ):
        meters = {}
        for name, aggregation in [
            ("calls", {"func": "count"}),
            ("tokens", {"func": "sum", "property": "tokens"}),
            ("peak", {"func": "max", "property": "tokens"}),  # not forwarded
        ]:
            created = client.post(
                "/v1/meters/",
                json={"name": name, "filter": ALL, "aggregation": aggregation},
            )
            assert created.status_code == 201, created.text
            meters[name] = created.json()["id"]
        base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=3)
        events = [
            {
                "name": "call",
                "external_customer_id": f"c{i % 3}",
                "external_id": f"e{i}",
                "timestamp": (base + timedelta(minutes=7 * i)).isoformat(),
                "metadata": {"tokens": i * 1.5},
            }
            for i in range(20)
        ]
        assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200

        wait_for("the forwarder to send every rollup upstream", lambda: forwarded(client))
        first = client.get("/v1/forwarder/").json()["sent"]
        late = {**events[0], "external_id": "late", "metadata": {"tokens": 100}}
        assert client.post("/v1/events/ingest", json={"events": [late]}).status_code == 200
        wait_for(
            "the late event's two rollups to be sent",
            lambda: client.get("/v1/forwarder/").json()["sent"] == first + 2,
        )

        assert client.get("/v1/forwarder/").json()["mode"] == "rollup"
    assert central.exit_code == 0
    landed = _rollup_events(central)
    ids = collections.Counter(external_id for external_id, _, _ in landed)
    assert max(ids.values()) == 1  # the stalled batch was re-sent and deduplicated
    assert all(i.startswith("meterline:rollup:") for i in ids)
    assert {m["meter_id"] for _, _, m in landed} == {meters["calls"], meters["tokens"]}

    expected: collections.Counter[tuple[str, str]] = collections.Counter()
    for event in [*events, late]:
        customer = event["external_customer_id"]
        expected[customer, meters["calls"]] += 1
        expected[customer, meters["tokens"]] += event["metadata"]["tokens"]
    upstream: collections.Counter[tuple[str, str]] = collections.Counter()
    for _, customer, metadata in landed:
        upstream[customer, metadata["meter_id"]] += metadata["units"]
    assert upstream == expected
    revisions = [m for _, _, m in landed if m["revision"] == 2]
    assert sorted(m["units"] for m in revisions) == [1, 100]  # the late event's period only
    assert all(m["period_end"] > m["period_start"] for _, _, m in landed)
