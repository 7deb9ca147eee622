"""The Kafka edge when the broker fails: every request is answered 2xx or 503 within the
deadline, and client retries with the same external_ids make the totals exact."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deadline import seconds_left, wait_for, waited_too_long
from tests.inprocess import token_cli
from tests.pipeline import Oracle, Pipeline, send_until_accepted, usage_batches
from tests.processes import edge_token, new_org_token

pytestmark = pytest.mark.processes

DEADLINE = 2.0
SLACK = 1.5  # scheduling on a shared 2-core machine


def _fire(
    client: httpx.Client,
    batches: list[list[dict[str, Any]]],
    answers: list[tuple[int, float]],
    stop: threading.Event | None = None,
) -> None:
    """One attempt per batch, recording (status, seconds), paced until `stop`; a transport
    error is status 0."""
    for batch in batches:
        if stop is not None:
            if stop.is_set():
                return
            time.sleep(0.05)  # pacing the load
        started = time.monotonic()
        try:
            status = client.post("/v1/events/ingest", json={"events": batch}).status_code
        except httpx.TransportError:
            status = 0
        answers.append((status, time.monotonic() - started))


def test_broker_paused_gets_503_in_time_and_retries_make_totals_exact(tmp_path: Path) -> None:
    with Pipeline(tmp_path, deadline_seconds=DEADLINE, processes=True) as pipeline:
        meter_id = pipeline.create_meter()
        batches = list(usage_batches(seed=5, batches=400, size=100, tag="pause"))
        answers: list[tuple[int, float]] = []
        stop = threading.Event()
        with pipeline.edges[0].client(pipeline.token()) as client:
            sender = threading.Thread(target=_fire, args=(client, batches, answers, stop))
            sender.start()
            wait_for("batches accepted before the pause", lambda: len(answers) >= 5)
            pipeline.broker.pause()
            time.sleep(2 * DEADLINE + 1)  # the point: requests meet the paused broker a while
            pipeline.broker.resume()
            resumed = len(answers)
            wait_for(
                "a batch accepted after the resume",
                lambda: any(status == 200 for status, _ in answers[resumed:]),
            )
            stop.set()
            sender.join(seconds_left())
            assert not sender.is_alive(), waited_too_long("the sender to stop")
            batches = batches[: len(answers)]
            statuses = {status for status, _ in answers}
            assert statuses <= {200, 503}, answers
            assert 503 in statuses, "the pause should have been felt"
            assert max(seconds for _, seconds in answers) <= DEADLINE + SLACK, answers
            # The client retries what was not accepted, with the same bodies.
            oracle = Oracle()
            for batch, (status, _) in zip(batches, answers, strict=True):
                if status != 200:
                    send_until_accepted(client, batch)
                oracle.add(batch)
        pipeline.wait_for_events(len(oracle.events))
        assert pipeline.quantity(meter_id) == sum(oracle.tokens_by_customer().values())


def test_broker_killed_gets_503_in_time_and_the_edge_recovers(tmp_path: Path) -> None:
    with Pipeline(tmp_path, deadline_seconds=DEADLINE, processes=True) as pipeline:
        batches = list(usage_batches(seed=6, batches=20, size=100, tag="kill"))
        answers: list[tuple[int, float]] = []
        with pipeline.edges[0].client(pipeline.token()) as client:
            pipeline.broker.kill()
            _fire(client, batches[:5], answers)
            assert {status for status, _ in answers} == {503}, answers
            assert max(seconds for _, seconds in answers) <= DEADLINE + SLACK, answers
            # The test broker keeps its log in memory: it comes back empty, so this checks
            # that the edge reconnects, not that records survive (Kafka's replication does).
            pipeline.broker.start()
            for batch in batches[5:]:
                send_until_accepted(client, batch)


def test_tokens_work_on_the_edge_and_revocation_reaches_it(tmp_path: Path) -> None:
    with Pipeline(tmp_path) as pipeline:
        token = edge_token(pipeline.edges[0], new_org_token(tmp_path, "edge-org"))
        body = {"events": [{"name": "a", "external_customer_id": "c", "external_id": "t-1"}]}
        with pipeline.edges[0].client(token) as client:
            assert client.post("/v1/events/ingest", json=body).status_code == 200
            listed = token_cli(tmp_path, "list").stdout.splitlines()
            (token_id,) = [line.split()[0] for line in listed if "edge-org" in line]
            assert token_cli(tmp_path, "revoke", token_id).returncode == 0
            revoked = time.monotonic()
            wait_for(
                "the edge to refuse the revoked token",
                lambda: client.post("/v1/events/ingest", json=body).status_code == 401,
            )
            assert time.monotonic() - revoked < 5
