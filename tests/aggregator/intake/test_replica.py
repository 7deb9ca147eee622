"""A replica (`--replica`) started from an empty data dir beside a core, on the same topics,
applies what that core journals while it runs: API writes sent to either and events sent to an
edge, in an order whose outcomes depend on it (the control topic test's workload), give at the
same journal offset the same digest and byte-equal answers to every list read, a credit plan's
second cycle and a credit grant's expiry (timed writes the core's plan cycler runs) included,
and the same webhook deliveries (the attempts and the customer.state_changed events the core
made are journal groups). A write sent to the replica is answered once applied, as on the
core. The replica reads no partition itself and delivers no webhook: a receiver gets each
alert once, from the core. Each lists both in `GET /v1/cluster/`."""

from __future__ import annotations

import contextlib
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from dateutil.relativedelta import relativedelta

from aggregator import cli
from ingest.http import OFFSET_HEADER, READ_AFTER_HEADER
from tests.aggregator.intake.test_control_topic import (
    READS,
    Workload,
    _assert_same,
    _ok,
    _settled_together,
)
from tests.aggregator.upstream.webhook_receiver import Receiver
from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline

pytestmark = pytest.mark.slow

ENDPOINTS = "/v1/webhooks/endpoints?limit=100"
DELIVERIES = "/v1/webhooks/deliveries?limit=100"


def _without_delivery_state(read: bytes) -> Any:
    """An endpoints list without what its deliveries made of it (delivering is the journaling
    core's alone, and not a record: a replica's endpoints never fail)."""
    found = orjson.loads(read)
    for item in found["items"]:
        for name in ("enabled", "disabled_reason", "failing_since", "modified_at"):
            item.pop(name, None)
    return found


@contextlib.contextmanager
def _receiving() -> Iterator[Receiver]:
    receiver = Receiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def _second_cycle_soon(client: httpx.Client, meter_id: str) -> str:
    """A monthly plan that started a month ago less a few seconds: its first cycle is granted
    when it is made, its second a few seconds later."""
    customer = _ok(client.post("/v1/customers/", json={"email": "plan@example.com"}))["id"]
    starts = datetime.now(UTC) - relativedelta(months=1) + timedelta(seconds=4)
    body = {
        "customer_id": customer,
        "meter_id": meter_id,
        "units": 100,
        "interval": "month",
        "starts_at": starts.isoformat(),
        "external_id": "plan",
    }
    return str(_ok(client.post("/v1/credit-plans/", json=body))["id"])


def _expiring_soon(client: httpx.Client, meter_id: str) -> str:
    """A grant of its own priority expiring a few seconds on, beside a plain credit: the
    leader's plan cycler expires it (a timed write, journaled as a plan cycle is). Its
    customer meter's id."""
    customer = _ok(client.post("/v1/customers/", json={"email": "grant@example.com"}))["id"]
    expires = (datetime.now(UTC) + timedelta(seconds=4)).isoformat()
    ref = {"customer_id": customer, "meter_id": meter_id}
    body = {**ref, "units": 50, "priority": 5, "expires_at": expires, "external_id": "expiring"}
    _ok(client.post("/v1/meter-credits/", json=body))
    _ok(client.post("/v1/meter-credits/", json={**ref, "units": 10, "external_id": "plain"}))
    found = _ok(client.get("/v1/customer-meters/", params=ref))["items"]
    return str(found[0]["id"])


def _cores(client: httpx.Client) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = _ok(client.get("/v1/cluster/"))["items"]
    return items


def _plan(client: httpx.Client, plan_id: str) -> dict[str, Any]:
    (found,) = [p for p in _ok(client.get("/v1/credit-plans/"))["items"] if p["id"] == plan_id]
    return found


@pytest.mark.processes
def test_a_replica_holds_the_state_of_the_core_it_follows(tmp_path: Path) -> None:
    workload = Workload(5)
    args = ("--allow-private-webhooks",)
    with Pipeline(tmp_path / "core", edges=1, core_args=args) as pipeline:
        assert pipeline.core is not None
        secret = tmp_path / "cluster.secret"
        shutil.copy(pipeline.data_dir / "secret.key", secret)
        replica_args = (*pipeline.args(), *args, "--secret-file", str(secret), "--replica")
        choose = random.Random(5)
        with (
            _receiving() as receiver,
            ServedCore(tmp_path / "replica", *replica_args, dev_token=False) as replica,
            pipeline.core.client(pipeline.token()) as core,
            replica.client(pipeline.token()) as through_replica,
            pipeline.edges[0].client(pipeline.token()) as edge,
        ):
            workload.step(core, edge)  # a meter
            # Alerts delivered to a receiver: by the core only, each under one webhook-id.
            workload.alerting(core, receiver.url, "delivered")
            # And customer.state_changed: the core makes them as a journal group.
            hook = {"url": receiver.url, "format": "raw", "events": ["customer.state_changed"]}
            _ok(core.post("/v1/webhooks/endpoints", json=hook))
            for _ in range(40):  # API writes to either, answered once applied
                workload.step(choose.choice([core, through_replica]), edge)
            # A write answered by the core is read at once from the replica, asked to have
            # applied the control topic as far as that answer says (what edges ask).
            for _ in range(5):
                made = core.post("/v1/customers/", json={"email": f"{uuid.uuid4().hex}@x.org"})
                assert made.status_code == 201, made.text
                after = {READ_AFTER_HEADER: made.headers[OFFSET_HEADER]}
                read = through_replica.get(f"/v1/customers/{made.json()['id']}", headers=after)
                assert read.status_code == 200, read.text
                assert int(read.headers[OFFSET_HEADER]) >= int(made.headers[OFFSET_HEADER])
            # A plan whose second boundary comes a few seconds on: the core's plan cycler
            # processes it, as a journal group the replica applies too.
            plan = _second_cycle_soon(core, workload.meters[0])
            # And a grant's expiry, the same way.
            grants = f"/v1/customer-meters/{_expiring_soon(core, workload.meters[0])}/grants"
            wait_for("the plan's second cycle", lambda: _plan(core, plan)["cycles"] == 2)
            wait_for("the grant to expire", lambda: _ok(core.get(grants))["items"][0]["expired"])
            (first, reads), (again, reads_again) = _settled_together(
                core, through_replica, paths=(*READS, DELIVERIES, grants)
            )
            plans, plans_again = (
                c.get("/v1/credit-plans/").content for c in (core, through_replica)
            )
            # Each lists both, from their heartbeats.
            for client, me in ((core, "leader"), (through_replica, "replica")):
                wait_for("each core to list both", lambda c=client: len(_cores(c)) == 2)
                cores = _cores(client)
                assert {m["role"] for m in cores} == {"leader", "replica"}
                assert [m["role"] for m in cores if m["this"]] == [me]
                assert all(m["alive"] and m["journal_offset"] for m in cores)
            wait_for("a delivery", lambda: len(receiver.received) > 0)
            time.sleep(2)  # the point: time enough for a second delivery of any of them

            ids = [r.headers["webhook-id"] for r in receiver.received]
            assert len(ids) == len(set(ids)), ids
    _assert_same(first, again)
    assert plans_again == plans
    assert b"customer.state_changed" in reads[DELIVERIES]
    assert b"meter.credit_expired" in reads["events"]
    for path in (*READS, DELIVERIES, grants, "events"):
        if path == ENDPOINTS:
            assert _without_delivery_state(reads_again[path]) == _without_delivery_state(
                reads[path]
            )
        else:
            assert reads_again[path] == reads[path], path
    assert workload.endpoints and workload.meters and workload.customers


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ((), "needs --kafka"),
        (
            (
                "--kafka",
                "127.0.0.1:9",
                "--upstream-url",
                "http://127.0.0.1:9",
                "--upstream-token",
                "t",
            ),
            "forwards nothing",
        ),
    ],
)
def test_a_replica_needs_kafka_and_forwards_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], said: str
) -> None:
    assert (
        cli.main(["core" if extra else "up", "--data-dir", str(tmp_path), "--replica", *extra]) == 2
    )
    assert said in capsys.readouterr().err
