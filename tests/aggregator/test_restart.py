"""Acknowledged events survive a restart, graceful or `kill -9`, of the real process."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from tests.deadline import seconds_left, wait_for
from tests.pipeline import send_until_accepted
from tests.processes import MeterlineServer

pytestmark = pytest.mark.processes


def _batch(tag: str, n: int, size: int = 200) -> dict[str, object]:
    return {
        "events": [
            {
                "name": "tokens",
                "external_customer_id": f"{tag}-c{i % 7}",
                "external_id": f"{tag}-{n}-{i}",
                "metadata": {"tokens": i, "_cost": {"amount": "0.25", "currency": "usd"}},
            }
            for i in range(size)
        ]
    }


def test_kill_9_under_load_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    acked: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    server = MeterlineServer(tmp_path).start()
    token = server.token

    def sender(worker: int) -> None:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as client:
            n = worker
            while not stop.is_set():
                try:
                    response = client.post("/v1/events/ingest", json=_batch(tag, n))
                except httpx.HTTPError:
                    return  # the server died mid-request: this batch is unacknowledged
                if response.status_code == 200:
                    assert response.json() == {"inserted": 200, "duplicates": 0}
                    with lock:
                        acked.append(n)
                n += 4

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    wait_for("batches acknowledged before the kill", lambda: len(acked) >= 8)
    server.kill()  # SIGKILL while requests are in flight
    stop.set()
    for thread in threads:
        thread.join(seconds_left())

    assert len(acked) >= 4, f"only {len(acked)} batches acknowledged before the kill"
    print(f"{len(acked)} batches acknowledged before kill -9")

    with MeterlineServer(tmp_path) as restarted, restarted.client(token) as client:
        for n in acked:
            # Every acknowledged event is stored: re-sending its batch inserts nothing.
            again = client.post("/v1/events/ingest", json=_batch(tag, n)).json()
            assert again == {"inserted": 0, "duplicates": 200}, n
        total = client.get("/v1/events/").json()["pagination"]["total_count"]
        assert total >= 200 * len(acked)


def test_graceful_restart_keeps_events_and_customers(tmp_path: Path) -> None:
    with MeterlineServer(tmp_path) as server, server.client() as client:
        token = server.token
        client.post("/v1/customers/", json={"email": "a@b.io", "external_id": "a"})
        assert client.post("/v1/events/ingest", json=_batch("g", 0)).json()["inserted"] == 200
    with MeterlineServer(tmp_path) as again, again.client(token) as client:
        assert again.token == token  # the development token is stable across restarts
        assert client.get("/v1/events/").json()["pagination"]["total_count"] == 200
        assert client.get("/v1/customers/external/a").status_code == 200


def test_validation_workers_exit_with_a_killed_server(tmp_path: Path) -> None:
    server = MeterlineServer(tmp_path, validation_workers=2).start()
    children = server.children()
    assert children, "expected validation worker processes"
    server.kill()
    wait_for(
        "the validation workers to exit",
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
    )


def test_a_killed_validation_worker_does_not_break_ingest(tmp_path: Path) -> None:
    with (
        MeterlineServer(tmp_path, validation_workers=2) as server,
        server.client() as client,
    ):
        for pid in server.children():
            os.kill(pid, signal.SIGKILL)
        big = _batch("w", 0, size=1000)  # large enough to go to the workers
        assert client.post("/v1/events/ingest", json=big).json() == {
            "inserted": 1000,
            "duplicates": 0,
        }
        # And the pool works again afterwards: on a loaded machine the workers it starts anew
        # may not answer within the first request's deadline (a 503 the client retries with the
        # same external ids), never losing or doubling anything.
        send_until_accepted(client, _batch("w", 1, size=1000)["events"])
        assert client.get("/v1/events/").json()["pagination"]["total_count"] == 2000
        assert len(server.children()) >= 2
