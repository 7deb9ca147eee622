"""A cluster under load, killed piece by piece (real processes): a broker, two cores (each
forwarding upstream when it leads, and taking snapshots every few seconds) and two edges in
front of them. While events and credits flow through the edges and a client asks the balance
check every 50 ms, a core is killed (SIGKILL) five times and started again on its data dir, the
leader is paused past its session timeout once, and the broker is paused as long (an outage
that keeps its log: on this machine Tansu keeps it across a kill only in S3, and on moto's
server, even as a process of its own, a record's produce-to-fetch trip of about 40 ms grew to
20-60 s after some 25 records, moto at 90% of a core). Against a plain-Python record of what was
acknowledged: no event lost or doubled on either core, every balance as acknowledged, the two
cores' digests equal, each alert crossing delivered under one `webhook-id`, every event
forwarded, and at least 99% of the checks answered."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from benchmarks.takeover import Checks
from tests.aggregator.intake.test_control_topic import _assert_same, _ok, _settled_together
from tests.aggregator.upstream.test_forward_takeover import Upstream
from tests.aggregator.upstream.webhook_receiver import Receiver
from tests.deadline import seconds_left, wait_for, waited_too_long
from tests.processes import Broker, MeterlineServer, free_port

pytestmark = pytest.mark.processes

SEED = 41
CUSTOMERS = 8
THRESHOLDS = (50, 200, 400)  # consumed units: each alert crosses once per customer
SESSION_SECONDS = 4


class Load(threading.Thread):
    """Batches of events sent to the edges in turn, each until answered 200 (the same body
    again after any failure: its external ids make that safe); what was acknowledged."""

    def __init__(self, edges: list[str], token: str, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.acknowledged: dict[str, tuple[str, int]] = {}  # external id: (customer, tokens)
        self._edges, self._token, self._rng = edges, token, rng
        self._done = threading.Event()
        self.retried = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        with httpx.Client(headers=headers, timeout=15) as client:
            sent = 0
            while not self._done.is_set():
                batch = {
                    uuid.uuid4().hex: (
                        f"c{self._rng.randrange(CUSTOMERS)}",
                        self._rng.randint(1, 3),
                    )
                    for _ in range(10)
                }
                events = [
                    {
                        "name": "use",
                        "external_customer_id": customer,
                        "external_id": external_id,
                        "metadata": {"tokens": tokens},
                    }
                    for external_id, (customer, tokens) in batch.items()
                ]
                while True:  # until acknowledged, whatever is down meanwhile
                    edge = self._edges[sent % len(self._edges)]
                    sent += 1
                    with contextlib.suppress(httpx.HTTPError):
                        answer = client.post(f"{edge}/v1/events/ingest", json={"events": events})
                        if answer.status_code == 200:
                            break
                    self.retried += 1
                    time.sleep(0.2)  # pacing the retries
                self.acknowledged.update(batch)
                time.sleep(0.1)  # pacing the load

    def stop(self) -> None:
        self._done.set()
        self.join(seconds_left())
        assert not self.is_alive(), waited_too_long("the load to stop")


def _credit(edge: str, token: str, customer: str, meter: str, units: int) -> None:
    """A credit sent until answered 201, with one Idempotency-Key: applied once."""
    key = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    body = {"external_customer_id": customer, "meter_id": meter, "units": units, "external_id": key}

    def answered() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.post(f"{edge}/v1/meter-credits/", json=body, headers=headers, timeout=40)
            assert answer.status_code in (200, 201, 502, 503, 504), answer.text
            return answer.status_code in (200, 201)
        return False

    wait_for(f"a credit for {customer} to be answered", answered)


class Cluster:
    """Two cores on one broker, started, killed and started again on their data dirs."""

    def __init__(self, tmp: Path, broker: Broker, common: tuple[str, ...]) -> None:
        self.tmp, self.broker, self.common = tmp, broker, common
        self.ports = {"a": free_port(), "b": free_port()}
        self.cores: dict[str, MeterlineServer] = {}
        self.headers: dict[str, str] = {}  # the token, once the first core made it

    def args(self, name: str) -> tuple[str, ...]:
        snaps = ("--backup-to", str(self.tmp / f"snapshots-{name}"), "--backup-every-seconds", "3")
        secret = () if name == "a" else ("--secret-file", str(self.tmp / "a" / "secret.key"))
        return (*self.common, *snaps, *secret)

    def start(self, name: str) -> MeterlineServer:
        command = "up" if name == "a" and name not in self.cores else "core"
        core = MeterlineServer(
            self.tmp / name, *self.args(name), command=command, port=self.ports[name]
        )
        self.cores[name] = core.start()
        return core

    def leader(self) -> str:
        """The core that says it leads (waiting for one, after a takeover)."""

        def leading() -> str | None:
            for name, core in self.cores.items():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    listed = httpx.get(f"{core.url}/v1/cluster/", headers=self.headers, timeout=2)
                    for member in listed.json()["items"]:
                        if member["this"] and member["role"] == "leader":
                            return name
            return None

        return wait_for("a core to lead", leading)

    def stop(self) -> None:
        for core in self.cores.values():
            with contextlib.suppress(Exception):
                os.kill(core.pid, signal.SIGCONT)
            core.kill()


def _balances(client: httpx.Client, meter: str) -> dict[str, tuple[float, float]]:
    items = _ok(client.get("/v1/customer-meters/", params={"meter_id": meter, "limit": 100}))
    return {
        i["customer"]["external_id"]: (i["consumed_units"], i["credited_units"])
        for i in items["items"]
    }


def _events(client: httpx.Client) -> int:
    found = client.get("/v1/events/", params={"limit": 1, "source": "user"})
    return int(_ok(found)["pagination"]["total_count"])


def test_a_cluster_killed_piece_by_piece_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    with Broker() as broker, Receiver() as receiver, Upstream().serving() as upstream:
        common = (
            *("--kafka", broker.bootstrap, "--no-idempotence", "--partitions", "3"),
            *("--consumer-session-timeout-seconds", str(SESSION_SECONDS)),
            *("--validation-workers", "0", "--allow-private-webhooks"),
            *("--upstream-url", upstream.url, "--upstream-token", "t"),
            *("--upstream-batch-events", "100"),
        )
        cluster = Cluster(tmp_path, broker, common)
        edges: list[MeterlineServer] = []
        try:
            a = cluster.start("a")
            wait_for(
                "the first core to lead", lambda: any("this core leads" in x for x in a.output)
            )
            token = a.token
            assert token is not None
            cluster.headers = {"Authorization": f"Bearer {token}"}
            cluster.start("b")
            cores = [f"--core={core.url}" for core in cluster.cores.values()]
            kafka = common[: common.index("--allow-private-webhooks")]
            for _ in range(2):
                edge = MeterlineServer(tmp_path / "a", *kafka, *cores, command="ingest")
                edges.append(edge.start())
            meter, crossed = _set_up(edges[0].url, token, receiver.url)
            load = Load([e.url for e in edges], token, rng)
            check = (
                "/v1/customer-meters/check",
                {"external_customer_id": "c0", "meter_id": meter, "units": 1},
            )
            credited: collections.Counter[str] = collections.Counter()
            with Checks(edges[0].url, token, check[0], check[1], timeout=2) as checks:
                load.start()
                _chaos(
                    cluster,
                    broker,
                    rng,
                    lambda: _credit_some(edges, token, meter, rng, credited),
                )
                load.stop()
            # Settled: both cores hold every acknowledged event, at one journal offset.
            acknowledged = load.acknowledged
            clients = [cluster.cores[n].client(token) for n in ("a", "b")]
            try:
                for client in clients:
                    wait_for(
                        "both cores to hold every acknowledged event",
                        lambda c=client: _events(c) >= len(acknowledged),
                    )
                (reached, _), (again, _) = _settled_together(*clients)
                counts = [_events(c) for c in clients]
                balances = [_balances(c, meter) for c in clients]
            finally:
                for client in clients:
                    client.close()
            wait_for(
                "every acknowledged event forwarded upstream",
                lambda: set(upstream.ids()) >= set(acknowledged),
            )
        finally:
            for edge in edges:
                edge.kill()
            cluster.stop()
    # 0 lost, 0 doubled, on both cores; every balance as acknowledged.
    assert counts == [len(acknowledged)] * 2, (counts, len(acknowledged))
    consumed: collections.Counter[str] = collections.Counter()
    for customer, tokens in acknowledged.values():
        consumed[customer] += tokens
    expected = {
        c: (float(consumed[c]), float(credited[c]))
        for c in (f"c{i}" for i in range(CUSTOMERS))
        if consumed[c] or credited[c]
    }
    assert balances[0] == balances[1] == expected, (balances, expected)
    _assert_same(reached, again)
    # Every event forwarded; each crossing delivered, under one webhook-id.
    assert set(upstream.ids()) == set(acknowledged)
    ids = crossed(receiver)
    assert set(ids) == {(t, c) for t in THRESHOLDS for c, n in consumed.items() if n >= t}, ids
    assert len(ids) > len(consumed), "too few crossings to tell"
    assert all(len(found) == 1 for found in ids.values()), ids
    answered = sum(ok for _, ok in checks.asked)
    assert answered >= 0.99 * len(checks.asked), (answered, len(checks.asked))
    print(
        f"soak: {len(acknowledged)} events acknowledged ({load.retried} sends retried),"
        f" checks {answered}/{len(checks.asked)} answered"
    )


def _set_up(
    edge: str, token: str, hook: str
) -> tuple[str, Callable[[Receiver], dict[tuple[int, str], set[str]]]]:
    """Through an edge: a sum meter, the customers, an endpoint and an alert; the meter's id
    and what reads the webhook-ids per crossing customer off the receiver."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=edge, headers=headers, timeout=40) as client:
        meter = _ok(
            client.post(
                "/v1/meters/",
                json={
                    "name": "tokens",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "sum", "property": "tokens"},
                },
            )
        )["id"]
        names = {}
        for c in range(CUSTOMERS):
            made = _ok(
                client.post("/v1/customers/", json={"email": f"c{c}@x.org", "external_id": f"c{c}"})
            )
            names[made["id"]] = f"c{c}"
        _ok(
            client.post(
                "/v1/webhooks/endpoints",
                json={"url": hook, "format": "raw", "events": ["meter.alert"]},
            )
        )
        for threshold in THRESHOLDS:
            alert = {
                "meter_id": meter,
                "metric": "consumed_units",
                "operator": "gte",
                "threshold": threshold,
                "external_id": str(threshold),
            }
            _ok(client.post("/v1/meter-alerts/", json=alert))

    def crossed(receiver: Receiver) -> dict[tuple[int, str], set[str]]:
        found: dict[tuple[int, str], set[str]] = {}
        for r in list(receiver.received):
            data = orjson.loads(r.body)["data"]
            crossing = (
                int(data["alert"]["external_id"]),
                names[data["customer_meter"]["customer_id"]],
            )
            found.setdefault(crossing, set()).add(r.headers["webhook-id"])
        return found

    return meter, crossed


def _credit_some(
    edges: list[MeterlineServer],
    token: str,
    meter: str,
    rng: random.Random,
    credited: collections.Counter[str],
) -> None:
    customer, units = f"c{rng.randrange(CUSTOMERS)}", rng.randint(1, 20)
    _credit(edges[rng.randrange(len(edges))].url, token, customer, meter, units)
    credited[customer] += units


def _chaos(
    cluster: Cluster, broker: Broker, rng: random.Random, between: Callable[[], None]
) -> None:
    """Five kills of a core (the leader, or the other), a pause of the leader past its session
    timeout, a broker kill; a credit between any two. (The sleeps are the schedule of the
    faults, under load all along: the point, not waits for a state.)"""

    steps = ["kill"] * 5 + ["pause", "broker"]
    rng.shuffle(steps)
    for step in steps:
        time.sleep(rng.uniform(2, 4))
        between()
        if step == "kill":
            name = cluster.leader() if rng.random() < 0.6 else rng.choice(["a", "b"])
            cluster.cores[name].kill()
            time.sleep(rng.uniform(0, 2))
            cluster.start(name)
        elif step == "pause":
            paused = cluster.cores[cluster.leader()]
            os.kill(paused.pid, signal.SIGSTOP)
            time.sleep(SESSION_SECONDS + 2)
            os.kill(paused.pid, signal.SIGCONT)
        else:  # an outage of the broker that keeps its log
            broker.pause()
            time.sleep(SESSION_SECONDS)
            broker.resume()
    time.sleep(3)
    between()
