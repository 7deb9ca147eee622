"""Corrections after ingest through an edge (Kafka mode, `ingest.http.positions`): an edge
answers an ingest once Kafka holds its events, before a core has applied them, so a void by
external ids sent right after its answer once reached a core that had not: 200, the ids in
`not_found`, and the events counting on. Now the answer names where its events are, the edge
sends that with the organization's corrections, and the core applies a correction after them;
a client reads what it ingested by sending the header itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ingest.http import EVENTS_AFTER_HEADER
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline

pytestmark = pytest.mark.processes

ROUNDS = 40


def test_a_void_sent_right_after_the_edges_answer_finds_every_event(tmp_path: Path) -> None:
    with Pipeline(tmp_path / "core", partitions=3, edges=0) as pipeline:
        assert pipeline.core is not None
        secret = tmp_path / "cluster.secret"
        shutil.copy(pipeline.data_dir / "secret.key", secret)
        args = (*pipeline.args(), "--secret-file", str(secret), "--core", pipeline.core.url)
        with ServedCore(tmp_path / "edge", *args, command="ingest") as edge:
            token = pipeline.token()
            with edge.client(token) as client, pipeline.core.client(token) as core:
                missed = 0
                for n in range(ROUNDS):
                    keys = [f"r{n}-{i}" for i in range(5)]
                    events = [
                        {"name": "call", "external_customer_id": f"c{i}", "external_id": k}
                        for i, k in enumerate(keys)
                    ]
                    sent = client.post("/v1/events/ingest", json={"events": events})
                    assert sent.status_code == 200, sent.text
                    after = sent.headers[EVENTS_AFTER_HEADER]
                    if n % 2:  # a read of them, straight to the core, names them
                        listed = core.get(
                            "/v1/events/",
                            params={"external_customer_id": "c0", "limit": 1},
                            headers={EVENTS_AFTER_HEADER: after},
                        )
                        # The earlier rounds' are voided: this one's alone.
                        assert listed.json()["pagination"]["total_count"] == 1, listed.text
                    voided = client.post(
                        "/v1/events/void", json={"external_ids": keys, "reason": "sent twice"}
                    )
                    assert voided.status_code == 200, voided.text
                    missed += len(voided.json()["not_found"])
                assert missed == 0
