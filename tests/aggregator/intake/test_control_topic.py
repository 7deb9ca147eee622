"""Kafka mode: every API write is a record on the control topic, and the journal fixes one order
for every core. A core started afterwards from an empty data dir on the same topics holds the
same state as the core that answered the writes: at the same journal offset, the same digest and
byte-equal JSON for every read; also when the first core was killed and restarted midway.

The workload is one whose outcome depends on the order of the topics' records: holds settled by
events still arriving, customers created by the API under external ids that events also name,
one external id sent for two customers (on two partitions), credits to customers events alone
create."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from aggregator.auth import TokenRegistry
from aggregator.store.engine.migrations import migrate
from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline, produce_raw, send_until_accepted, topic_records
from tests.processes import Broker

pytestmark = pytest.mark.processes

READS = (
    "/v1/customers/?limit=100",
    "/v1/meters/?limit=100",
    "/v1/customer-meters/?limit=100",
    "/v1/meter-holds/?limit=100",
    "/v1/meter-alerts/?limit=100",
    "/v1/webhooks/endpoints?limit=100",
    "/v1/event-types/?limit=100",
)
PORTAL = "/v1/customer-portal/meters/?limit=100"


def _ok(response: httpx.Response, *codes: int) -> dict[str, Any]:
    assert response.status_code in (codes or (200, 201)), response.text
    return response.json() if response.content else {}


class Workload:
    """A random sequence of API writes and event batches (`seed`)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.meters: list[str] = []
        self.customers: list[str] = []  # made through the API, without external ids
        self.batch = 0
        self.endpoints = 0

    def alerting(self, client: httpx.Client, url: str, external_id: str) -> None:
        """A receiver at `url` for `meter.alert`, an alert `external_id` on the first meter
        from one unit consumed, and the customers the events name, made before any event:
        each then crosses with an event of its own (a customer made after its usage would not
        fire: no event takes it across)."""
        hook = {"url": url, "format": "raw", "events": ["meter.alert"]}
        _ok(client.post("/v1/webhooks/endpoints", json=hook))
        alert = {
            "meter_id": self.meters[0],
            "metric": "consumed_units",
            "operator": "gte",
            "threshold": 1,
            "external_id": external_id,
        }
        _ok(client.post("/v1/meter-alerts/", json=alert))
        for i in range(4):  # the user-N that `step` names
            body = {"email": f"user-{i}@example.com", "external_id": f"user-{i}"}
            _ok(client.post("/v1/customers/", json=body))

    def step(self, core: httpx.Client, edge: httpx.Client) -> None:
        rng = self.rng
        choice = rng.choice(
            ["meter", "customer", "credit", "events", "events", "alert", "hold", "endpoint"]
            if self.meters
            else ["meter"]
        )
        if choice == "meter":
            aggregation = rng.choice(
                [
                    {"func": "sum", "property": "tokens"},
                    {"func": "count"},
                    {"func": "max", "property": "tokens"},
                ]
            )
            body = {
                "name": f"meter {len(self.meters)}",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": aggregation,
            }
            self.meters.append(_ok(core.post("/v1/meters/", json=body))["id"])
        elif choice == "customer":
            # Under an external id that events name too, some of the time (already taken: 409).
            body = {"email": f"c{len(self.customers)}@example.com"}
            if rng.random() < 0.5:
                body["external_id"] = f"user-{rng.randrange(4)}"
            made = _ok(core.post("/v1/customers/", json=body), 201, 409, 422)
            if "id" in made:
                self.customers.append(made["id"])
        elif choice == "credit":
            # To a customer events alone may create: found or not, as the journal's order says.
            ref = {"external_customer_id": f"user-{rng.randrange(4)}"}
            if self.customers and rng.random() < 0.5:
                ref = {"customer_id": rng.choice(self.customers)}
            body = {**ref, "meter_id": rng.choice(self.meters), "units": rng.randrange(1, 50)}
            body["external_id"] = f"credit-{rng.random()}"
            _ok(core.post("/v1/meter-credits/", json=body), 201, 404, 422)
        elif choice == "alert":
            body = {
                "meter_id": rng.choice(self.meters),
                "metric": "consumed_units",
                "operator": "gte",
                "threshold": rng.randrange(10, 10_000),
                "external_id": f"alert-{rng.random()}",
            }
            _ok(core.post("/v1/meter-alerts/", json=body), 201)
        elif choice == "hold":
            # Settled by the usage event of its external id, which may be in flight or to come.
            body = {
                "external_customer_id": f"user-{rng.randrange(4)}",
                "meter_id": rng.choice(self.meters),
                "units": rng.randrange(1, 5),
                "external_id": f"e-{self.batch + rng.randrange(2)}-{rng.randrange(3)}",
            }
            _ok(core.post("/v1/meter-holds/", json=body), 201, 404, 409, 422)
        elif choice == "endpoint":
            url = f"http://127.0.0.1:9/{rng.random()}"
            body = {"url": url, "format": "raw", "events": ["meter.alert"]}
            _ok(core.post("/v1/webhooks/endpoints", json=body), 201)
            self.endpoints += 1
        else:
            self.batch += 1
            # Now and then the external ids of a batch sent before, for other customers.
            batch = self.batch if rng.random() < 0.7 else rng.randrange(1, self.batch + 1)
            events = [
                {
                    "name": "llm_call",
                    "external_customer_id": f"user-{rng.randrange(4)}",
                    "external_id": f"e-{batch}-{i}",
                    "metadata": {"tokens": rng.randrange(1, 500)},
                }
                for i in range(rng.randrange(1, 40))
            ]
            send_until_accepted(edge, events)


def _state(
    client: httpx.Client, paths: tuple[str, ...] = READS
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The digest and the reads, all taken at one journal offset: a core that applies a journal
    entry while they are read (a follower, as its leader journals on) is read again."""
    while True:
        digest = _ok(client.get("/v1/cluster/digest"))
        reads = {path: client.get(path).content for path in paths}
        events, page = [], 1
        while True:
            answer = _ok(client.get("/v1/events/", params={"limit": 100, "page": page}))
            events += answer["items"]
            if page >= answer["pagination"]["max_page"]:
                break
            page += 1
        reads["events"] = orjson.dumps({"items": events})
        if _ok(client.get("/v1/cluster/digest"))["journal_offset"] == digest["journal_offset"]:
            return digest, reads


def _settled(
    client: httpx.Client, paths: tuple[str, ...] = READS
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The state once what the edge accepted is applied: unchanged over a second."""
    last = [_state(client, paths)]

    def unchanged() -> tuple[dict[str, Any], dict[str, bytes]] | None:
        time.sleep(1)  # the point: settled is unchanged over a second
        state = _state(client, paths)
        same, last[0] = state == last[0], state
        return state if same else None

    return wait_for("the core to settle (its state unchanged over a second)", unchanged)


def _assert_same(first: dict[str, Any], again: dict[str, Any]) -> None:
    """Two digests taken at the same journal offset are equal (naming first the tables that
    differ, if any). A partition a core was assigned as it came to lead but has read nothing
    from is at its log's start there (stored at assignment); a core that never led it names
    only what the journal applied: such offsets are left out."""
    for digest in (first, again):
        digest["events_offsets"] = {p: o for p, o in digest["events_offsets"].items() if o}
    differing = {t for t, v in again["tables"].items() if first["tables"].get(t) != v}
    assert differing == set()
    assert again == first


def _journal_offset(client: httpx.Client) -> int:
    return int(_ok(client.get("/v1/cluster/digest"))["journal_offset"])


def _settled_together(
    leader: httpx.Client, follower: httpx.Client, paths: tuple[str, ...] = READS
) -> tuple[tuple[dict[str, Any], dict[str, bytes]], tuple[dict[str, Any], dict[str, bytes]]]:
    """The leader's settled state and the follower's at the same journal offset. A leader
    journals on while webhook attempts to a failing endpoint retry (they change no digested
    table, so the leader looks settled): the follower may pass the offset it settled at, and
    then both are taken again."""

    def together() -> Any:
        first = _settled(leader, paths)
        target = first[0]["journal_offset"]
        wait_for(
            f"the follower to reach the leader's journal offset {target}",
            lambda: _journal_offset(follower) >= target,
        )
        again = _state(follower, paths)
        return (first, again) if again[0]["journal_offset"] == target else None

    return wait_for("the follower to stand at the leader's settled journal offset", together)


async def _control_records(bootstrap: str) -> list[bytes]:
    return [r.value or b"" for r in await topic_records(bootstrap, "meterline.events.control")]


def _second_core(pipeline: Pipeline, data_dir: Path) -> ServedCore:
    """A core on the same topics from an empty data dir but for the cluster secret: it takes
    organizations and tokens from the control topic, the development token included."""
    data_dir.mkdir()
    secret = data_dir / "cluster.secret"
    shutil.copy(pipeline.data_dir / "secret.key", secret)
    args = (*pipeline.args(), *pipeline.core_args, "--secret-file", str(secret))
    return ServedCore(data_dir, *args, dev_token=False)


def _credit_after_a_backfill(client: httpx.Client) -> None:
    """A meter defined after events, then, once this core has backfilled it, a credit on it:
    the credit's answer (kept for its key) holds the backfilled usage, on every core, because
    the backfill's steps are in the journal's order."""
    body = {
        "name": "late meter",
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "sum", "property": "tokens"},
    }
    meter = _ok(client.post("/v1/meters/", json=body))["id"]
    wait_for(
        "the late meter's backfill",
        lambda: client.get(f"/v1/meters/{meter}").json()["backfill"]["status"] == "done",
    )
    credit = {"external_customer_id": "user-0", "meter_id": meter, "units": 5, "external_id": "l"}
    answer = _ok(client.post("/v1/meter-credits/", json=credit))
    assert answer["customer_meter"]["consumed_units"] > 0, answer


def _drive(pipeline: Pipeline, workload: Workload, steps: int) -> None:
    assert pipeline.core is not None
    with (
        pipeline.core.client(pipeline.token()) as core,
        pipeline.edges[0].client(pipeline.token()) as edge,
    ):
        for _ in range(steps):
            workload.step(core, edge)


@pytest.mark.parametrize(("seed", "killed"), [(1, False), (3, True)])
def test_a_core_from_an_empty_data_dir_holds_the_same_state(
    tmp_path: Path, seed: int, killed: bool
) -> None:
    """`killed`: the first core is killed (SIGKILL) midway and restarted on its data dir."""
    workload = Workload(seed)
    args = ("--allow-private-webhooks",)
    with Pipeline(tmp_path / "first", edges=1, core_args=args, processes=killed) as pipeline:
        _drive(pipeline, workload, 20)
        if killed:
            pipeline.restart_core()
        _drive(pipeline, workload, 20)
        assert pipeline.core is not None
        with pipeline.core.client(pipeline.token()) as client:
            _credit_after_a_backfill(client)
            # A customer session's token works on any core (its record is on the topic).
            customer = _ok(client.post("/v1/customers/", json={"email": "portal@example.com"}))
            session = _ok(
                client.post("/v1/customer-sessions/", json={"customer_id": customer["id"]})
            )
            first, reads = _settled(client)
        with pipeline.core.client(session["token"]) as client:
            portal = _ok(client.get(PORTAL))
        # Webhook secrets travel sealed.
        records = asyncio.run(_control_records(pipeline.broker.bootstrap))
        assert any(b'"webhook.create"' in r for r in records) == bool(workload.endpoints)
        assert not any(b"whsec_" in r for r in records)
        assert any(b'"auth.session"' in r for r in records)
        assert not any(session["token"].encode() in r for r in records)
        pipeline.core.stop()
        with (
            _second_core(pipeline, tmp_path / "second") as second,
            second.client(pipeline.token()) as client,
        ):
            wait_for(
                "the second core to reach the first's journal offset",
                lambda: _journal_offset(client) >= first["journal_offset"],
            )
            again, reads_again = _settled(client)
            # Leading now, it journals its own retries of the workload's failing webhook
            # endpoints past where the first stopped; they change no digested table.
            assert again["journal_offset"] >= first["journal_offset"]
            again["journal_offset"] = first["journal_offset"]
            with second.client(session["token"]) as portal_client:
                assert _ok(portal_client.get(PORTAL)) == portal
    _assert_same(first, again)
    for path in (*READS, "events"):
        if reads_again[path] != reads[path]:
            print(
                path,
                orjson.dumps(orjson.loads(reads[path]), option=orjson.OPT_INDENT_2).decode()[:3000],
            )
            print(
                orjson.dumps(orjson.loads(reads_again[path]), option=orjson.OPT_INDENT_2).decode()[
                    :3000
                ]
            )
        assert reads_again[path] == reads[path], path


def test_topics_and_a_data_dir_of_the_previous_main_open_and_apply(tmp_path: Path) -> None:
    """The previous main made the events and dead-letter topics only (no control topic), and
    its data dir is at schema step 20: the core adds the control topic, applies the events the
    topic holds, and takes writes."""
    con = duckdb.connect(str(tmp_path / "meterline.duckdb"))
    assert migrate(con, until=20) == 20
    con.close()
    registry = TokenRegistry(tmp_path)
    organization = registry.organization("default")
    token = registry.create_token(organization, "upgrade")
    registry.close()
    with Broker() as broker:
        events = [
            {
                "organization_id": organization.id,
                "name": "llm_call",
                "external_customer_id": "ada",
                "external_id": f"old-{i}",
                "metadata": {"tokens": 10},
            }
            for i in range(5)
        ]
        asyncio.run(_previous_topics(broker.bootstrap, events))
        args = ("--kafka", broker.bootstrap, "--no-idempotence", "--partitions", "3")
        with ServedCore(tmp_path, *args) as core, core.client(token) as client:
            wait_for(
                "the core to apply the 5 events of the previous topics",
                lambda: _ok(client.get("/v1/events/"))["pagination"]["total_count"] == 5,
            )
            meter = {
                "name": "tokens",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": "sum", "property": "tokens"},
            }
            meter_id = _ok(client.post("/v1/meters/", json=meter), 201)["id"]
            ada = {"email": "ada@example.com", "external_id": "ada"}
            _ok(client.post("/v1/customers/", json=ada), 201)
            credit = {
                "external_customer_id": "ada",
                "meter_id": meter_id,
                "units": 100,
                "external_id": "after-upgrade",
            }
            applied = _ok(client.post("/v1/meter-credits/", json=credit), 201)
            wait_for(
                "the credit's customer meter to count the 50 units used",
                lambda: _ok(client.get("/v1/customer-meters/"))["items"][0]["consumed_units"] == 50,
            )

            assert applied["customer_meter"]["credited_units"] == 100
            # Three writes, after the organization and token records the core published.
            assert _ok(client.get("/v1/cluster/digest"))["control_offset"] >= 3


async def _previous_topics(bootstrap: str, events: list[dict[str, Any]]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic("meterline.events", 3, 1), NewTopic("meterline.events.dead", 3, 1)]
        )
    finally:
        await admin.close()
    await produce_raw(bootstrap, [([], orjson.dumps(event)) for event in events])
