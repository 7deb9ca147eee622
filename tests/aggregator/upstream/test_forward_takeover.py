"""Forwarding and the lakehouse export across a takeover (real processes, one broker): two cores
given the same upstream and the same export target, the first leading. Only the leader forwards,
and it records what the upstream answered as journal groups that the standby applies too;
killed (SIGKILL) mid-forwarding, it is replaced by the standby, which forwards on from the last
answer recorded: every event reaches the upstream, and what is sent twice (under its own
external id, which the upstream deduplicates) is at most what the dead leader had sent but not
yet recorded. The new leader exports on from the position the table holds (the cores of a
shard number events alike): each event, before the takeover and after, is in the table once."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest

from tests.aggregator.export.lake import read
from tests.aggregator.upstream.polar_upstream import Upstream
from tests.deadline import wait_for
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer

pytestmark = pytest.mark.processes

EVENTS = 400
BATCH = 20  # events per upstream request
RATE = 300  # upstream requests per minute: 100 events a second


def _exported(lake: Path) -> collections.Counter[str]:
    """The user events' external ids in the export's table, with how many times each is."""
    if not (lake / "events").exists():
        return collections.Counter()
    rows = read(lake, "SELECT external_id FROM events WHERE source = 'user'")
    return collections.Counter(rows.column("external_id").to_pylist())


def test_a_new_leader_forwards_on_from_the_last_answer_recorded(tmp_path: Path) -> None:
    with Upstream().serving() as upstream:
        forwarding = (
            *("--upstream-url", upstream.url, "--upstream-token", "upstream-token"),
            *("--upstream-batch-events", str(BATCH), "--upstream-rate", str(RATE)),
        )
        lake = tmp_path / "lake"
        forwarding += ("--export-to", str(lake), "--export-max-events", "50")
        with Pipeline(tmp_path / "a", edges=1, core_args=forwarding, processes=True) as pipeline:
            first = pipeline.core
            assert isinstance(first, MeterlineServer)
            wait_for(
                "the first core to lead", lambda: any("this core leads" in x for x in first.output)
            )
            secret = tmp_path / "cluster.secret"
            shutil.copy(pipeline.data_dir / "secret.key", secret)
            standby_args = (*pipeline.args(), *forwarding, "--secret-file", str(secret))
            with MeterlineServer(tmp_path / "b", *standby_args, command="core") as second:
                wait_for(
                    "the second core to follow",
                    lambda: any("follows the leader" in line for line in second.output),
                )
                with pipeline.edges[0].client(pipeline.token()) as edge:
                    for b in range(EVENTS // 100):
                        events = [
                            {"name": "call", "external_customer_id": "c", "external_id": f"{b}-{i}"}
                            for i in range(100)
                        ]
                        answer = edge.post("/v1/events/ingest", json={"events": events})
                        assert answer.status_code == 200, answer.text
                # Half forwarded, by the leader alone: nothing sent twice yet.
                wait_for("half the events forwarded", lambda: len(upstream.ids()) >= EVENTS // 2)
                before = upstream.ids()
                first.kill()
                assert max(before.values()) == 1, "both cores forwarded"
                assert len(before) < EVENTS
                wait_for(
                    "the new leader to forward the rest", lambda: len(upstream.ids()) == EVENTS
                )

                assert any("this core leads" in line for line in second.output)
                after = [
                    {"name": "call", "external_customer_id": "c", "external_id": f"after-{i}"}
                    for i in range(10)
                ]
                with pipeline.edges[0].client(pipeline.token()) as edge:
                    answer = edge.post("/v1/events/ingest", json={"events": after})
                    assert answer.status_code == 200, answer.text
                wait_for(
                    "the new leader to export them", lambda: len(_exported(lake)) == EVENTS + 10
                )
                wait_for("and to forward them", lambda: len(upstream.ids()) == EVENTS + 10)
    exported = _exported(lake)
    assert max(exported.values()) == 1, "exported twice"
    sent = upstream.ids()
    firsts = {f"{b}-{i}" for b in range(EVENTS // 100) for i in range(100)}
    assert set(sent) == set(exported) == firsts | {f"after-{i}" for i in range(10)}
    twice = [i for i, n in sent.items() if n > 1]
    # At most what the leader had in flight and unrecorded: a request or two at this rate.
    assert len(twice) <= 2 * BATCH, (len(twice), len(before))
