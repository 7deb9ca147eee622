"""`kill -9` of an exporting core (`meterline up --export-to DIR`), five times while events
arrive and are exported in commits of 1,000 at most: afterwards the table holds every
acknowledged event exactly once, and its per-customer totals are the API's.
The oracle is what the core acknowledged; a request cut by a kill is sent again with the same
external ids, as a client with retries does."""

from __future__ import annotations

import collections
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.aggregator.export.lake import read
from tests.deadline import wait_for
from tests.pipeline import send_until_accepted
from tests.processes import MeterlineServer

pytestmark = pytest.mark.processes

SEED = int(os.environ.get("METERLINE_KILL_SEED", "65"))
KILLS = 5
BATCH = 200
PAUSE = 0.05  # seconds between two requests: a few thousand events a second
CUSTOMERS = 7
WINDOW = {
    "start_timestamp": "2026-03-01T00:00:00Z",
    "end_timestamp": "2026-03-31T23:59:59Z",
    "interval": "month",
}


def _batch(number: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "call",
            "external_customer_id": f"c{(number * BATCH + i) % CUSTOMERS}",
            "external_id": f"b{number}-{i}",
            "timestamp": f"2026-03-{1 + (number + i) % 28:02d}T12:00:00Z",
            "metadata": {"tokens": 1 + (number * 7 + i) % 50},
        }
        for i in range(BATCH)
    ]


def _lag(server: MeterlineServer) -> float:
    with server.client() as client:
        text = client.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("meterline_export_lag_events "))
    return float(line.split()[1])


def test_five_kills_while_exporting_leave_each_event_once(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    lake = tmp_path / "lake"
    args = ("--export-to", str(lake), "--export-max-events", "1000")
    server = MeterlineServer(tmp_path / "data", *args).start()
    acknowledged: list[str] = []
    stop = threading.Event()
    current = [server]

    def send() -> None:
        number = 0
        while not stop.is_set():
            events = _batch(number)
            with current[0].client() as client:
                send_until_accepted(client, events)
            acknowledged.extend(e["external_id"] for e in events)
            number += 1
            time.sleep(PAUSE)

    sender = threading.Thread(target=send, name="sender")
    sender.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 1.5))
            current[0].kill()
            current[0] = MeterlineServer(tmp_path / "data", *args, port=server.port).start()
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
    server = current[0]
    try:
        with server.client() as client:
            meter = client.post(
                "/v1/meters/",
                json={
                    "name": "tokens",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "sum", "property": "tokens"},
                },
            ).json()
        wait_for("the export to catch up", lambda: _lag(server) == 0)
        rows = read(lake).to_pylist()
        user = [r for r in rows if r["source"] == "user"]
        counted = collections.Counter(r["external_id"] for r in user)
        assert not [k for k, n in counted.items() if n > 1], "exported twice"
        assert set(acknowledged) <= set(counted), "acknowledged but not exported"
        assert len(acknowledged) > 5 * BATCH
        exported: collections.Counter[str] = collections.Counter()
        for r in user:
            exported[r["external_customer_id"]] += json.loads(r["metadata"])["tokens"]
        with server.client() as client:
            for customer in exported:
                params = {**WINDOW, "external_customer_id": customer}
                answer = client.get(f"/v1/meters/{meter['id']}/quantities", params=params)
                assert answer.json()["total"] == exported[customer], customer
    finally:
        server.stop()
