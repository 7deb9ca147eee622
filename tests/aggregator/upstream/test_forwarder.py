"""Forwarding to an upstream that is a second real meterline, through a loopback proxy that
injects faults: every event lands upstream exactly once, the refused one is quarantined with the
upstream's reason, Retry-After is honoured and the request rate never exceeds the limit."""

from __future__ import annotations

import collections
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from tests.deadline import wait_for
from tests.faults import forwarding
from tests.processes import Server

pytestmark = pytest.mark.serial  # it measures the rate requests go upstream at

RATE = 300.0  # requests per minute: one every 0.2 s
TIMEOUT = 1.0  # the edge's upstream timeout; a stall outlasts it
JITTER = 0.1  # seconds a request may take from the edge to the proxy on a loaded machine


def _all_external_ids(central: Server) -> collections.Counter[str]:
    """Every external_id the central stored, read from its DuckDB file once it has stopped
    (the API does not show external ids, as in Polar)."""
    with duckdb.connect(str(central.data_dir / "meterline.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT external_id FROM events").fetchall()
    return collections.Counter(r[0] for r in rows)


def test_every_event_lands_once_through_faults(tmp_path: Path) -> None:
    # The central refuses timestamps more than 1 s ahead; the edge takes up to 5 minutes: the
    # one event dated 2 minutes ahead is valid here and refused there.
    with (
        forwarding(
            tmp_path,
            ["429", "503", "stall", "reset", "pass", "503"],
            *("--upstream-rate", str(RATE), "--upstream-batch-events", "40"),
            *("--upstream-timeout", str(TIMEOUT)),
            central_args=("--max-future-seconds", "1"),
        ) as (central, proxy, edge),
        edge.client() as client,
    ):
        future = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
        batches = [
            [
                {
                    "name": "call",
                    "external_customer_id": f"c{i % 3}",
                    "external_id": f"b{b}-{i}",
                }
                for i in range(30)
            ]
            for b in range(5)
        ]
        batches[2][7]["timestamp"] = future
        batches[3].append({"name": "call", "external_customer_id": "c9"})  # no id
        for batch in batches:
            assert client.post("/v1/events/ingest", json={"events": batch}).status_code == 200
        wait_for(
            "the forwarder's backlog to empty",
            lambda: client.get("/v1/forwarder/").json()["backlog"] == 0,
        )

        status = client.get("/v1/forwarder/").json()
        (quarantined,) = client.get("/v1/forwarder/quarantine").json()["items"]
        # Still two minutes ahead for the central: re-sending it is refused again.
        resent = client.post(f"/v1/forwarder/quarantine/{quarantined['seq']}/resend")
        assert resent.json()["result"].startswith("rejected: timestamp"), resent.text
        assert len(client.get("/v1/forwarder/quarantine").json()["items"]) == 1
        assert client.post("/v1/forwarder/quarantine/1/resend").status_code == 404
    assert central.exit_code == 0
    assert quarantined["event"]["external_id"] == "b2-7"
    assert "timestamp" in quarantined["reason"]
    assert status["quarantined"] == 1 and status["retried"] >= 5
    landed = _all_external_ids(central)
    expected = {f"b{b}-{i}" for b in range(5) for i in range(30)} - {"b2-7"}
    assert set(landed) - expected == {next(k for k in landed if k.startswith("meterline:"))}
    assert expected <= set(landed)
    assert max(landed.values()) == 1, [k for k, n in landed.items() if n > 1]
    # Never faster than the rate: the n-th request after any one arrives no sooner than n
    # spacings later. The proxy sees arrivals, so one request delayed on its way (a new
    # connection after the stall) may arrive closer to the next: JITTER allows for that, and
    # a burst of two requests still fails.
    times = [t for t, _ in proxy.ingests]
    early = [
        (i, j, times[j] - times[i])
        for i, j in itertools.combinations(range(len(times)), 2)
        if times[j] - times[i] < (j - i) * 60 / RATE - JITTER
    ]
    assert not early, (early, times)
    after_429 = [b - a for (a, act), (b, _) in itertools.pairwise(proxy.ingests) if act == "429"]
    assert after_429 and min(after_429) >= 1.0  # Retry-After honoured
