"""Shards killed while they move rows (real processes): two shard cores of a topic of four
partitions, beside a one-shard core on the same topics, take events without an external id
that name customers by their id while the customers route by their external id, so that about
half the rows are moved to the other shard. While the events flow, each shard's core is
killed (SIGKILL) in turn and started again on its data dir: a core killed after its moved rows
were acknowledged and before its batch was journaled moves them again on restart. Against a
plain-Python record of what was acknowledged, every customer's events and tokens are on its
shard exactly once: nothing lost, nothing doubled, with no external id to dedupe them."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from aggregator.api.shard_routing import ROUTED_HEADER
from tests.aggregator.intake.test_control_topic import _ok
from tests.aggregator.intake.test_shards import _events, _moved, _quantity, _shard_of
from tests.deadline import seconds_left, wait_for, waited_too_long
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer, free_port

pytestmark = pytest.mark.processes

PARTITIONS = 4
SHARDS = 2
CUSTOMERS = 8
KILLS = 6
BATCH = 200  # events a request: batches that take a while to apply widen the window


class Load(threading.Thread):
    """Batches of events without an external id, each sent once until answered 200 (a batch
    answered otherwise was not accepted: sent again); the tokens acknowledged per customer."""

    def __init__(self, edge: str, token: str, customers: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.tokens: dict[str, int] = dict.fromkeys(customers, 0)
        self.events: dict[str, int] = dict.fromkeys(customers, 0)
        self._edge, self._token, self._customers = edge, token, customers
        self._rng = random.Random(seed)
        self._done = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        with httpx.Client(headers=headers, timeout=15) as client:
            while not self._done.is_set():
                batch = [
                    (self._rng.choice(self._customers), self._rng.randint(1, 9))
                    for _ in range(BATCH)
                ]
                events = [
                    {"name": "use", "customer_id": c, "metadata": {"tokens": t}} for c, t in batch
                ]
                answer = client.post(f"{self._edge}/v1/events/ingest", json={"events": events})
                if answer.status_code != 200:
                    time.sleep(0.1)  # pacing the retries
                    continue
                for customer, tokens in batch:
                    self.tokens[customer] += tokens
                    self.events[customer] += 1

    def stop(self) -> None:
        self._done.set()
        self.join(seconds_left())
        assert not self.is_alive(), waited_too_long("the load to stop")


def _customers(client: httpx.Client, org: str) -> list[str]:
    """Customers with an external id whose id's partition is on the other shard than their
    external id's (each of their rows is moved), and a few on the same one."""
    apart: list[str] = []
    together: list[str] = []
    for i in range(200):
        external = f"kill-{i}"
        made = _ok(
            client.post(
                "/v1/customers/", json={"email": f"{external}@example.com", "external_id": external}
            )
        )["id"]
        moved = _shard_of(org, f"id:{made}", PARTITIONS, SHARDS) != _shard_of(
            org, f"ext:{external}", PARTITIONS, SHARDS
        )
        (apart if moved else together).append(made)
        if len(apart) >= CUSTOMERS - 2 and len(together) >= 2:
            return apart[: CUSTOMERS - 2] + together[:2]
    raise AssertionError("no customers on two shards")


def test_shards_killed_while_moving_rows_lose_and_double_nothing(tmp_path: Path) -> None:
    with Pipeline(tmp_path / "one", partitions=PARTITIONS) as pipeline:
        assert pipeline.core is not None
        secret = ("--secret-file", str(pipeline.data_dir / "secret.key"))
        ports = [free_port() for _ in range(SHARDS)]

        def shard(i: int) -> MeterlineServer:
            args = (*pipeline.args(), *secret, "--shard", f"{i}/{SHARDS}")
            return MeterlineServer(tmp_path / f"shard{i}", *args, command="core", port=ports[i])

        cores = [shard(i).start() for i in range(SHARDS)]
        load: Load | None = None
        try:
            token = pipeline.token()
            meter = pipeline.create_meter()
            org = pipeline.organization_id()
            with pipeline.core.client(token) as one:
                customers = _customers(one, org)
            clients = [
                httpx.Client(base_url=c.url, headers=_auth(token), timeout=30) for c in cores
            ]
            for client in clients:  # every shard knows every customer before events name it
                wait_for(
                    "every shard to know every customer", lambda c=client: _known(c, customers)
                )
            load = Load(pipeline.edges[0].url, token, customers, seed=59)
            load.start()
            rng = random.Random(59)
            for kill in range(KILLS):
                victim = kill % SHARDS
                # Killed once it has moved rows since it started: mid-way through moving.
                wait_for(
                    f"shard {victim} to move rows since its start",
                    lambda v=victim: _moved_since_start(clients[v]) > 0,
                )
                time.sleep(rng.uniform(0.0, 0.5))  # the point: a random moment of the moving
                cores[victim].kill()
                clients[victim].close()
                cores[victim] = shard(victim).start()
                clients[victim] = httpx.Client(
                    base_url=cores[victim].url, headers=_auth(token), timeout=30
                )
            load.stop()
            total = sum(load.events.values())
            assert total > 0
            wait_for(
                "the shards to hold every acknowledged event",
                lambda: sum(_events(c, here=True) for c in clients) >= total,
            )
            time.sleep(1)  # the point: what a doubled row would add, had it come a moment later

            held = [_events(c, here=True) for c in clients]
            assert sum(held) == total, (held, total)
            for customer in customers:
                on_shards = [_quantity(c, meter, here=True, customer_id=customer) for c in clients]
                assert sum(on_shards) == load.tokens[customer], (customer, on_shards)
                assert sorted(on_shards)[:-1] == [0] * (SHARDS - 1), on_shards  # one shard
            assert sum(_moved(c) for c in clients) > 0
        finally:
            if load is not None:
                load.stop()
            for core in cores:
                core.kill()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _known(client: httpx.Client, customers: list[str]) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return all(
            client.get(f"/v1/customers/{c}", headers={ROUTED_HEADER: "1"}).status_code == 200
            for c in customers
        )
    return False


def _moved_since_start(client: httpx.Client) -> int:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return _moved(client)
    return 0
