"""Splitting shards under load (`intake.splits`): two shard cores (real processes) apply events
an edge keeps sending, naming customers by either id (so rows are moved between shards); then
`meterline split --from 2 --to 4`. Each old core cuts its partitions where it has applied them
and stops by itself (exit 0); four new shards are made from their data dirs (`meterline restore
--shard J/4`) and go on from the cuts while the edge still sends. Once the new shards have
applied everything, each customer's events and quantities are exactly what was sent (nothing
lost, nothing counted twice), on its shard alone, with its credit; an old core started again
on its data dir refuses (exit 2)."""

from __future__ import annotations

import contextlib
import io
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator import cli
from aggregator.api.shard_routing import ROUTED_HEADER
from tests.aggregator.intake.test_control_topic import _ok
from tests.aggregator.intake.test_shards import _moved, _shard_of
from tests.deadline import seconds_left, wait_for
from tests.inprocess import ServedCore
from tests.pipeline import TOKENS_METER, _wide
from tests.processes import Broker, MeterlineServer, edge_token

pytestmark = pytest.mark.processes

PARTITIONS = 8


def _args(broker: Broker, shard: str, secret: Path | None = None) -> tuple[str, ...]:
    """A shard core's options; `secret`: the cluster secret, when not its data dir's own."""
    return (
        *("--kafka", broker.bootstrap, "--no-idempotence", "--partitions", str(PARTITIONS)),
        *("--consumer-session-timeout-seconds", "4", "--shard", shard),
        *(("--secret-file", str(secret)) if secret else ()),
    )


class Load:
    """Batches of events sent through the edge until stopped, each naming a customer by its id
    or its external id, some with an external id and some without (nothing would hide a
    double count of those); what was acknowledged, per customer."""

    def __init__(self, edge: httpx.Client, customers: list[dict[str, Any]]) -> None:
        self._edge = edge
        self._customers = customers
        self._rng = random.Random(20261126)
        self.events: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(seconds_left())

    def wait_batches(self, more: int) -> None:
        target = self.batches + more
        wait_for(f"{more} more batches accepted", lambda: self.batches >= target)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch, sent = [], Counter[str]()
            tokens = Counter[str]()
            for i in range(self._rng.randrange(5, 40)):
                customer = self._rng.choice(self._customers)
                ref = {"customer_id": customer["id"]}
                if customer["external_id"] and self._rng.random() < 0.5:
                    ref = {"external_customer_id": customer["external_id"]}
                amount = self._rng.randrange(1, 1000)
                event = {"name": "llm_call", **ref, "metadata": {"tokens": amount}}
                if i % 2:
                    event["external_id"] = f"load-{self.batches}-{i}"
                batch.append(event)
                sent[customer["id"]] += 1
                tokens[customer["id"]] += amount
            answer = self._edge.post("/v1/events/ingest", json={"events": batch})
            assert answer.status_code == 200, answer.text
            self.events.update(sent)
            self.tokens.update(tokens)
            self.batches += 1
            self._stop.wait(0.02)  # pacing the load


def _split(broker: Broker, secret: Path) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        command = ["split", "--kafka", broker.bootstrap, "--no-idempotence"]
        assert (
            cli.main([*command, "--from", "2", "--to", "4", "--data-dir", str(secret.parent)]) == 0
        )
    return printed.getvalue()


def test_splitting_two_shards_into_four_under_load_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Broker())
        old0 = stack.enter_context(MeterlineServer(tmp_path / "old0", *_args(broker, "0/2")))
        secret = tmp_path / "old0" / "secret.key"  # the cluster's, as every process has it
        old1 = MeterlineServer(tmp_path / "old1", *_args(broker, "1/2", secret), command="core")
        old = [old0, stack.enter_context(old1)]
        token = old0.token
        assert token is not None
        edge = ServedCore(
            tmp_path / "edge",
            *("--kafka", broker.bootstrap, "--no-idempotence", "--secret-file", str(secret)),
            command="ingest",
        )
        stack.enter_context(edge)
        one = stack.enter_context(old0.client(token))
        other = stack.enter_context(old1.client(token))
        meter = _ok(one.post("/v1/meters/", json=TOKENS_METER))["id"]
        customers, crossing = [], False
        for i in range(40):
            # Ten or more, until one has its id and its external id on different shards: ids
            # are random, and with none such (1 run in 64) nothing would be moved.
            if i >= 10 and crossing:
                break
            body = {"email": f"c{i}@x.org", **({"external_id": f"c{i}"} if i % 3 else {})}
            made = _ok(one.post("/v1/customers/", json=body))
            customers.append({"id": made["id"], "external_id": made["external_id"]})
            org, keys = made["organization_id"], [f"id:{made['id']}", f"ext:c{i}"]
            shards = {_shard_of(org, key, PARTITIONS, 2) for key in keys}
            crossing |= bool(made["external_id"]) and len(shards) == 2
        assert crossing
        for customer in customers:  # every shard knows them before events name them
            path = f"/v1/customers/{customer['id']}"
            wait_for(
                "the other shard to know every customer",
                lambda p=path: other.get(p, headers={ROUTED_HEADER: "1"}).is_success,
            )
        credited = customers[1]
        credit = {"customer_id": credited["id"], "meter_id": meter, "units": 5000}
        _ok(one.post("/v1/meter-credits/", json={**credit, "external_id": "before-split"}))
        sending = stack.enter_context(edge.client(edge_token(edge, token)))
        with Load(sending, customers) as load:
            load.wait_batches(40)
            # Rows keyed by the other shard's id were moved (once the cores, behind the edge's
            # acknowledgements under load, have applied them).
            wait_for("rows moved to the other shard", lambda: _moved(one) + _moved(other) > 0)
            printed = _split(broker, secret)
            assert "shard 0/2 cut at" in printed and "shard 1/2 cut at" in printed, printed
            for core in old:  # retired: each stopped by itself
                assert core.ended("the old shard to retire") == 0, "\n".join(core.output[-30:])
                assert any("retired" in line for line in core.output), core.output[-30:]
            new = []
            for j in range(4):
                made = ["restore", "--shard", f"{j}/4", "--from", str(tmp_path / f"old{j % 2}")]
                assert cli.main([*made, "--data-dir", str(tmp_path / f"new{j}")]) == 0
                core = ServedCore(
                    tmp_path / f"new{j}", *_args(broker, f"{j}/4", secret), dev_token=False
                )
                new.append(stack.enter_context(core))
            load.wait_batches(40)
        # Started again, a retired core refuses.
        command = [sys.executable, "-m", "aggregator.cli", "up", *_args(broker, "0/2")]
        again = subprocess.run(
            [*command, "--data-dir", str(tmp_path / "old0")],
            capture_output=True,
            text=True,
            timeout=seconds_left(),
            check=False,
        )
        assert again.returncode == 2, again.stdout + again.stderr
        assert "retired" in again.stderr
        clients = [stack.enter_context(core.client(token)) for core in new]
        expected = sum(load.events.values())

        def held(client: httpx.Client) -> int:
            found = client.get("/v1/events/", params={"limit": 1}, headers={ROUTED_HEADER: "1"})
            return int(_ok(found)["pagination"]["total_count"])

        # Every event applied once: the new shards hold as many as were sent (the credit's
        # system event is one more), and the organization's list says so from any of them.
        wait_for(
            "the new shards to hold every event sent",
            lambda: sum(map(held, clients)) >= expected + 1,
        )

        assert sum(map(held, clients)) == expected + 1
        for client in clients:
            total = _ok(client.get("/v1/events/", params={"limit": 1}))["pagination"]
            assert total["total_count"] == expected + 1
        for customer in customers:
            quantity = _ok(
                clients[0].get(
                    f"/v1/meters/{meter}/quantities",
                    params={**_wide(), "customer_id": customer["id"]},
                )
            )
            assert quantity["total"] == load.tokens[customer["id"]], customer
            listed = [
                held_here
                for client in clients
                if (
                    held_here := _ok(
                        client.get(
                            "/v1/events/",
                            params={"customer_id": customer["id"], "limit": 1},
                            headers={ROUTED_HEADER: "1"},
                        )
                    )["pagination"]["total_count"]
                )
            ]
            # On one shard alone (the credited customer's system event is its shard's).
            assert listed == [load.events[customer["id"]] + (customer is credited)], customer
        balance = _ok(
            clients[2].get(
                "/v1/customer-meters/",
                params={"customer_id": credited["id"], "meter_id": meter},
            )
        )["items"]
        assert [m["credited_units"] for m in balance] == [5000]
        assert balance[0]["consumed_units"] == load.tokens[credited["id"]]
