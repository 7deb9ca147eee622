"""Corrections in Kafka mode: each is a write record (decision 15), so cores applying the same
topics hold the same state, and on shards a customer's correction is its shard's.

One deployment on one broker serves every test here: a one-shard core (`Pipeline`, with an
edge), its replica (`--replica`, started on an empty data dir) and, on the same topics, two
shard cores (`--shard I/2`), each applying its partitions and the whole control topic.

- Voids (by ids, by external ids, by filter), amendments and replacements (of one customer and
  of every one, dry runs among them) sent through the core between batches of events: the
  replica, and a core started afterwards on an empty data dir, which rebuilds its state from
  the log, answer the core's digest and reads at the same journal offset. A replacement sent
  again with its `Idempotency-Key` (to the replica) is answered as first, and applied once.
- On the shards, a void or a replacement of one customer, an amendment of one of its events
  and a dry run, each sent to the shard that does not hold the customer, are answered by the
  one that does, rightly, and change only that shard: the other stores no system event, and
  its events are as they were. A replacement of every customer changes each shard's own
  customers' events, and a void by ids the events each holds, each answered by every shard's
  outcome merged; the shards then hold what the one-shard core holds.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.api.shard_routing import ROUTED_HEADER
from meters.columnar import partition_of
from meters.records import subject_key
from tests.aggregator.intake.test_control_topic import (
    _assert_same,
    _journal_offset,
    _ok,
    _settled_together,
)
from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.pipeline import TOKENS_METER, Pipeline, send_until_accepted

pytestmark = pytest.mark.processes

PARTITIONS = 4
# Each correction costs every core here (four, in this process) about 0.2 s to apply.
STEPS = 15
SHARDS = 2
DAY = datetime(2026, 2, 1, tzinfo=UTC)
WINDOW = {
    "start_timestamp": (DAY - timedelta(days=1)).isoformat(),
    "end_timestamp": (DAY + timedelta(days=2)).isoformat(),
    "interval": "day",
}
MORE_METERS = [
    {**TOKENS_METER, "name": name, "aggregation": aggregation}
    for name, aggregation in (
        ("largest", {"func": "max", "property": "tokens"}),
        ("distinct", {"func": "unique", "property": "tokens"}),
        ("calls", {"func": "count"}),
    )
]


@dataclass
class Cluster:
    pipeline: Pipeline
    replica: ServedCore
    shards: list[ServedCore]
    root: Path
    secret: Path

    def core_args(self) -> tuple[str, ...]:
        return (*self.pipeline.args(), "--secret-file", str(self.secret))


def _done(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    """A void job (`POST /v1/events/void` by filter) once it says it is done."""
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(_ok(client.get(f"/v1/events/void/{job['id']}")))
        return bool(found["done"])

    wait_for(f"void job {job['id']} to be done", done)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("corrections")
    with Pipeline(root / "one", partitions=PARTITIONS) as pipeline:
        secret = root / "cluster.secret"
        shutil.copy(pipeline.data_dir / "secret.key", secret)
        args = (*pipeline.args(), "--secret-file", str(secret))
        with contextlib.ExitStack() as stack:
            replica = stack.enter_context(
                ServedCore(root / "replica", *args, "--replica", dev_token=False)
            )
            shards = [
                stack.enter_context(
                    ServedCore(
                        root / f"shard{i}", *args, "--shard", f"{i}/{SHARDS}", dev_token=False
                    )
                )
                for i in range(SHARDS)
            ]
            yield Cluster(pipeline, replica, shards, root, secret)


def _at(minute: int) -> str:
    return (DAY + timedelta(minutes=minute)).isoformat()


class Corrections:
    """A seeded random mix of event batches (through the edge) and corrections (through the
    core): voids by ids, external ids and filter, amendments, replacements of one customer or
    of every one, dry runs, credits."""

    def __init__(self, seed: int, core: httpx.Client, edge: httpx.Client) -> None:
        self.rng = random.Random(seed)
        self.core, self.edge = core, edge
        self.batch = 0
        self.done: dict[str, int] = {}

    def step(self) -> None:
        rng = self.rng
        kind = rng.choice(
            ["events", "events", "void", "external", "filter", "amend", "replace", "all", "dry"]
        )
        if kind == "events" or self.batch == 0:
            self.batch += 1
            events = [
                {
                    "name": rng.choice(["llm", "embed"]),
                    "external_customer_id": f"user-{rng.randrange(4)}",
                    "external_id": f"b{self.batch}-{i}",
                    "timestamp": _at(rng.randrange(600)),
                    "metadata": {"tokens": rng.randrange(1, 50)},
                }
                for i in range(rng.randrange(5, 30))
            ]
            send_until_accepted(self.edge, events)
            kind = "events"
        elif kind == "void":
            ids = [e["id"] for e in self._listed()[:5] if rng.random() < 0.5]
            if ids:
                _ok(self.core.post("/v1/events/void", json={"ids": ids, "reason": "twice"}))
        elif kind == "external":
            keys = [f"b{rng.randrange(1, self.batch + 1)}-{rng.randrange(10)}" for _ in range(3)]
            body = {"external_ids": keys, "reason": "twice"}
            _ok(self.core.post("/v1/events/void", json=body))
        elif kind == "filter":
            start = rng.randrange(600)
            chosen = {
                "external_customer_id": f"user-{rng.randrange(4)}",
                "start_timestamp": _at(start),
                "end_timestamp": _at(start + rng.randrange(1, 120)),
            }
            body = {"filter": chosen, "reason": "bad range"}
            _done(self.core, _ok(self.core.post("/v1/events/void", json=body), 202))
        elif kind == "amend":
            listed = self._listed()
            if listed:
                event = rng.choice(listed)
                change = rng.choice(
                    [
                        {"metadata": {"tokens": rng.randrange(1, 50)}},
                        {"timestamp": _at(rng.randrange(600))},
                        {"external_customer_id": f"user-{rng.randrange(4)}"},
                    ]
                )
                _ok(self.core.patch(f"/v1/events/{event['id']}", json=change))
        else:
            _ok(self.core.post("/v1/events/replace", json=self.replacement(kind)))
        self.done[kind] = self.done.get(kind, 0) + 1

    def replacement(self, kind: str) -> dict[str, Any]:
        rng = self.rng
        start = rng.randrange(540)
        named = {} if kind == "all" else {"external_customer_id": f"user-{rng.randrange(4)}"}
        events = [
            {
                "name": "llm",
                **(named or {"external_customer_id": f"user-{rng.randrange(4)}"}),
                "external_id": f"r{self.batch}-{rng.randrange(1000)}",
                "timestamp": _at(start + rng.randrange(60)),
                "metadata": {"tokens": rng.randrange(1, 50)},
            }
            for _ in range(rng.randrange(0, 10))
        ]
        return {
            **named,
            "start_timestamp": _at(start),
            "end_timestamp": _at(start + 60),
            "events": events,
            "dry_run": kind == "dry",
        }

    def _listed(self) -> list[dict[str, Any]]:
        found = _ok(self.core.get("/v1/events/", params={"limit": 20, "source": "user"}))
        items: list[dict[str, Any]] = found["items"]
        return items


def test_a_replica_and_a_core_rebuilt_from_the_log_hold_the_corrected_state(
    cluster: Cluster,
) -> None:
    pipeline = cluster.pipeline
    assert pipeline.core is not None
    token = pipeline.token()
    with (
        pipeline.core.client(token) as core,
        pipeline.edges[0].client(token) as edge,
        cluster.replica.client(token) as replica,
    ):
        for meter in (TOKENS_METER, *MORE_METERS):
            _ok(core.post("/v1/meters/", json=meter))
        for i in range(2):  # customers made, under external ids that events name
            _ok(
                core.post(
                    "/v1/customers/", json={"email": f"u{i}@x.org", "external_id": f"user-{i}"}
                )
            )
        workload = Corrections(63, core, edge)
        for _ in range(STEPS):
            workload.step()
        assert {"void", "filter", "amend", "replace", "all", "dry"} <= set(workload.done)
        # Sent again with its Idempotency-Key, a correction is answered as first, once applied.
        keyed = {"Idempotency-Key": "replace-once"}
        body = workload.replacement("replace")
        first_answer = _ok(core.post("/v1/events/replace", json=body, headers=keyed))
        events = _total(core, voided="true")
        assert _ok(replica.post("/v1/events/replace", json=body, headers=keyed)) == first_answer
        assert _total(core, voided="true") == events
        assert _total(core, voided="true") > _total(core) > 0  # some voided, some not
        (first, reads), (again, reads_again) = _settled_together(core, replica)
    _assert_same(first, again)
    assert reads_again == reads
    assert first["tables"]["voided_events"]["rows"] > 0
    assert first["tables"]["event_versions"]["rows"] > 0
    rebuilt = ServedCore(
        cluster.root / "rebuilt", *cluster.core_args(), "--replica", dev_token=False
    )
    with rebuilt, rebuilt.client(token) as client, pipeline.core.client(token) as core:
        wait_for(
            "the rebuilt core to reach the core's journal offset",
            lambda: _journal_offset(client) >= first["journal_offset"],
        )
        (first, reads), (again, reads_again) = _settled_together(core, client)
    _assert_same(first, again)
    assert reads_again == reads


def _total(client: httpx.Client, **params: str) -> int:
    found = _ok(client.get("/v1/events/", params={"limit": 1, **params}))
    return int(found["pagination"]["total_count"])


def _shard_of(org: str, subject: str) -> int:
    return partition_of(subject_key(org, subject).encode(), PARTITIONS) % SHARDS


def _held(client: httpx.Client, **params: str) -> int:
    """The events the asked core holds (`Meterline-Routed`: not merged with other shards')."""
    found = _ok(
        client.get("/v1/events/", params={"limit": 1, **params}, headers={ROUTED_HEADER: "1"})
    )
    return int(found["pagination"]["total_count"])


def _quantity(client: httpx.Client, meter: str, here: bool = False, **params: str) -> float:
    headers = {ROUTED_HEADER: "1"} if here else {}
    found = _ok(
        client.get(f"/v1/meters/{meter}/quantities", params={**WINDOW, **params}, headers=headers)
    )
    return float(found["total"])


def test_a_customers_correction_is_its_shards(cluster: Cluster) -> None:
    pipeline = cluster.pipeline.tenant("sharded")
    assert pipeline.core is not None
    token = pipeline.token()
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(pipeline.core.client(token))
        edge = stack.enter_context(pipeline.edges[0].client(token))
        shards = [stack.enter_context(s.client(token)) for s in cluster.shards]
        for shard in shards:
            wait_for(
                "every shard to take the token", lambda s=shard: s.get("/v1/meters/").is_success
            )
        org = pipeline.organization_id()
        meter = pipeline.create_meter()
        # Two customers, one on each shard: "made" (through the API), "named" (by events only).
        found: dict[int, str] = {}
        for i in range(100):
            found.setdefault(_shard_of(org, f"ext:c{i}"), f"c{i}")
        made, named = found[0], found[1]
        made_id = _ok(one.post("/v1/customers/", json={"email": "m@x.org", "external_id": made}))[
            "id"
        ]
        for shard in shards:
            wait_for(
                "every shard to apply the customer",
                lambda s=shard: s.get(f"/v1/customers/external/{made}").is_success,
            )
        events = [
            {
                "name": "llm",
                "external_customer_id": customer,
                "external_id": f"{customer}-{i}",
                "timestamp": _at(i * 10),
                "metadata": {"tokens": i + 1},
            }
            for customer in (made, named)
            for i in range(30)
        ]
        send_until_accepted(edge, events)
        wait_for("the shards to hold the events", lambda: _held(shards[0]) + _held(shards[1]) == 60)
        wait_for("the one-shard core to hold them", lambda: _held(one) == 60)
        assert [_held(s, external_customer_id=made) for s in shards] == [30, 0]
        assert [_held(s, external_customer_id=named) for s in shards] == [0, 30]

        # A void by filter of `made` (shard 0's) sent to shard 1: voided there, answered right.
        chosen = {
            "external_customer_id": made,
            "start_timestamp": _at(0),
            "end_timestamp": _at(100),
        }
        job = _ok(shards[1].post("/v1/events/void", json={"filter": chosen, "reason": "x"}), 202)
        assert _done(shards[1], job)["voided"] == 10  # read on either shard
        assert [_held(s) for s in shards] == [20, 30]
        assert _system(shards[0], "event.voided") == 1
        assert _system(shards[1], "event.voided") == 0

        # A replacement of `named` (shard 1's) sent to shard 0, after its dry run there.
        replacing = [
            {**e, "external_id": f"new-{n}", "metadata": {"tokens": 100}}
            for n, e in enumerate(events[30:35])
        ]
        body = {
            "external_customer_id": named,
            "start_timestamp": _at(0),
            "end_timestamp": _at(150),
            "events": replacing,
        }
        before = _quantity(shards[0], meter, external_customer_id=named)
        assert before == sum(range(1, 31))
        dry = _ok(shards[0].post("/v1/events/replace", json={**body, "dry_run": True}))
        expected = {"voided": 15, "inserted": 5, "duplicates": 0}
        assert {k: dry[k] for k in expected} == expected
        [change] = [m for m in dry["meters"] if m["meter_id"] == meter]
        assert (change["before"], change["after"]) == (sum(range(1, 16)), 500)
        assert [_held(s) for s in shards] == [20, 30]  # a dry run changes nothing
        done = _ok(shards[0].post("/v1/events/replace", json=body))
        assert {k: done[k] for k in expected} == expected
        assert done["meters"] == dry["meters"]
        assert done["customer_meters"] == dry["customer_meters"]
        assert [_held(s) for s in shards] == [20, 20]
        assert (
            _quantity(shards[0], meter, external_customer_id=named)
            == before - sum(range(1, 16)) + 500
        )
        assert _system(shards[1], "event.replaced") == 1
        assert _system(shards[0], "event.replaced") == 0

        # An amendment of one of `made`'s events sent to shard 1.
        [event] = _ok(
            shards[0].get(
                "/v1/events/",
                params={"external_customer_id": made, "limit": 1, "sorting": "timestamp"},
                headers={ROUTED_HEADER: "1"},
            )
        )["items"]
        amended = _ok(
            shards[1].patch(f"/v1/events/{event['id']}", json={"metadata": {"tokens": 7}})
        )
        assert amended["version"] == 2
        assert amended["metadata"] == {"tokens": 7}
        assert [_held(s) for s in shards] == [20, 20]
        assert _system(shards[0], "event.amended") == 1
        assert _system(shards[1], "event.amended") == 0

        # A replacement of every customer's range: each shard replaces its own customers'.
        every = {
            "start_timestamp": _at(200),
            "end_timestamp": _at(300),
            "events": [
                {
                    "name": "llm",
                    "external_customer_id": c,
                    "timestamp": _at(250),
                    "metadata": {"tokens": 1000},
                }
                for c in (made, named)
            ],
        }
        # Answered by every shard's outcome of it, merged: counts added, the sum meter's
        # quantities added, each customer meter its shard's.
        merged = _ok(shards[0].post("/v1/events/replace", json=every))
        assert {k: merged[k] for k in expected} == {"voided": 20, "inserted": 2, "duplicates": 0}
        assert merged["meters"] == [
            {"meter_id": meter, "before": 2 * sum(range(21, 31)), "after": 2000}
        ]
        assert [c["customer_id"] for c in merged["customer_meters"]] == [made_id]
        assert [_held(s) for s in shards] == [11, 11]
        # A void by ids of events on both shards, sent to one: each voids its own. (Events
        # that came through the edge: a correction's new events have the ids of their seqs,
        # which the one-shard core, a deployment of its own, draws otherwise.)
        ids = [_at_minute(shards[0], 110), _at_minute(shards[1], 160)]
        unknown = "6a817fdf-1776-46fe-9a38-f8e6f4226181"
        voided = _ok(
            shards[1].post("/v1/events/void", json={"ids": [*ids, unknown], "reason": "x"})
        )
        assert (voided["voided"], sorted(voided["ids"]), voided["not_found"]) == (
            2,
            sorted(ids),
            [unknown],
        )
        assert [_held(s) for s in shards] == [10, 10]
        # The one-shard core, applying the same records, holds what the shards hold.
        wait_for("the one-shard core to apply them", lambda: _held(one) == 20)
        for customer in (made, named):
            ref = {"external_customer_id": customer}
            expected_total = _quantity(one, meter, **ref)
            assert [_quantity(s, meter, here=True, **ref) for s in shards] == [
                expected_total if _shard_of(org, f"ext:{customer}") == i else 0
                for i in range(SHARDS)
            ]


def _at_minute(client: httpx.Client, minute: int) -> str:
    """The id of the user event at `minute` of DAY the asked core holds."""
    params = {"source": "user", "limit": 100}
    found = _ok(client.get("/v1/events/", params=params, headers={ROUTED_HEADER: "1"}))["items"]
    [event] = [
        e
        for e in found
        if datetime.fromisoformat(e["timestamp"]) == DAY + timedelta(minutes=minute)
    ]
    return str(event["id"])


def _system(client: httpx.Client, name: str) -> int:
    """The system events `name` the asked core holds."""
    return _held(client, name=name, source="system")
