"""Shards (`--shard I/N`): beside a one-shard core, three shard cores on the same topics each
apply their own partitions of the events topic (p % 3 == I) and the whole control topic, with
their own journal and leader. Each customer's events are on one shard, whichever of its ids
they name (rows keyed by the other are moved there), where its quantities are the one-shard
core's; the shards' events add up to the one-shard core's, none on two; a customer's reads,
credits, holds and plan cycles asked of any shard are its shard's, and its ledger is on that
shard alone.

After seeded random workloads of two organizations (customers named by either id, some made
after their first events; events, some sent again, with the same external ids in both
organizations; credits; new meters), with a replica of a shard started mid-way from its
leader's snapshot (it then holds its leader's state), every organization-wide read (event
lists, names, types, customers, quantities, costs, holds, plans) of either organization and
each customer's asked of any shard is the one-shard core's, byte for byte; customer meters and
customer states too, but for their times of applying. The live stream, organization-wide or a
customer's, asked of shards that do not hold the customer, carries its changes. Dedupe is
exact within a shard: the same external id in events of customers of two shards is kept twice.
An external id events name is not given to a customer, whichever shard is asked. More shards
than partitions, or a data dir of another shard, is refused at start."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aggregator import cli
from aggregator.api import fan_out
from aggregator.api.shard_routing import ROUTED_HEADER
from ingest.kafka import Shard
from meters.columnar import partition_of
from meters.records import subject_key
from tests.aggregator.intake.test_control_topic import _assert_same, _ok, _settled_together
from tests.deadline import next_of, seconds_left, wait_for
from tests.inprocess import ServedCore
from tests.pipeline import TOKENS_METER, Pipeline, _wide, usage_batches

pytestmark = pytest.mark.processes

PARTITIONS = 6
SHARDS = 3
# The random workload: its seed (another, to try one: METERLINE_SHARD_SEED) and its steps.
SEED = int(os.environ.get("METERLINE_SHARD_SEED", "20261126"))
STEPS = 28
# A rule on the count meter (`MORE_METERS[-1]`): from a balance of 0, 5 calls at each of a
# customer's first three that fall below 1.
TOP_UP = {"threshold": 1, "units": 5, "max_per_period": 3, "period": "day"}


def _events(client: httpx.Client, here: bool = False) -> int:
    """The organization's events; `here`: those the asked core holds (`Meterline-Routed`: not
    merged with the other shards')."""
    headers = {ROUTED_HEADER: "1"} if here else {}
    found = _ok(client.get("/v1/events/", params={"limit": 1}, headers=headers))
    return int(found["pagination"]["total_count"])


def _held(*shards: httpx.Client) -> int:
    """The events the shards hold between them."""
    return sum(_events(shard, here=True) for shard in shards)


def _quantity(client: httpx.Client, meter_id: str, here: bool = False, **params: Any) -> float:
    """A meter's total; `here`: as the asked core holds it (`Meterline-Routed`: not sent on to
    the customer's shard)."""
    found = _ok(
        client.get(
            f"/v1/meters/{meter_id}/quantities",
            params={**_wide(), **params},
            headers={ROUTED_HEADER: "1"} if here else {},
        )
    )
    return float(found["total"])


def _this(client: httpx.Client) -> tuple[str, str]:
    """The answering core's shard and role, as `GET /v1/cluster/` lists it."""
    [this] = [c for c in _ok(client.get("/v1/cluster/"))["items"] if c["this"]]
    return this["shard"], this["role"]


def _figures(state: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A customer state's meters: (meter, consumed, credited, balance)."""
    return sorted(
        (m["meter_id"], m["consumed_units"], m["credited_units"], m["balance"])
        for m in state["active_meters"]
    )


def _balance(meter: dict[str, Any]) -> tuple[Any, ...]:
    """A customer meter's figures, without its times."""
    keys = ("id", "consumed_units", "credited_units", "balance", "held_units", "available")
    return tuple(meter[k] for k in keys)


def _watch(client: httpx.Client, params: dict[str, str], customer: str) -> queue.Queue[Any]:
    """The customer's changes on `client`'s live stream opened with `params`, once open (its
    `: open` comment: subscribed)."""
    found: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        with (
            contextlib.suppress(httpx.HTTPError),  # the client closes when the test ends
            client.stream("GET", "/v1/customer-meters/stream", params=params) as answer,
        ):
            if answer.status_code != 200:
                found.put(answer.read())
            event = None
            for line in answer.iter_lines():
                if line == ": open":
                    found.put("open")
                elif line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "customer_meter":
                    change = orjson.loads(line.removeprefix("data: "))
                    if change["customer_id"] == customer:
                        found.put(change)

    threading.Thread(target=read, daemon=True).start()
    assert next_of("the live stream to open", found) == "open"
    return found


def _customer_meters(client: httpx.Client) -> list[dict[str, Any]]:
    """Every page of the customer meters, newest first."""
    found: list[dict[str, Any]] = []
    for page in range(1, 100):
        answer = _ok(client.get("/v1/customer-meters/", params={"limit": 100, "page": page}))
        found += answer["items"]
        if page >= answer["pagination"]["max_page"]:
            return found
    raise AssertionError("more customer meters than expected")


def _changed(meter: dict[str, Any], sign: int) -> tuple[Any, ...]:
    """A customer meter's place in a list by last change (`sign` -1: newest first), never
    changed last."""
    at = meter["modified_at"]
    return (
        at is None,
        sign * (fan_out.micros(at) if at else 0),
        meter["customer_id"],
        meter["meter_id"],
    )


def _moved(client: httpx.Client) -> int:
    """The events this core moved to their customer's shard (`/metrics`)."""
    metrics = client.get("/metrics").text
    [line] = [x for x in metrics.splitlines() if x.startswith("meterline_consumer_moved_events")]
    return int(line.split()[-1])


def _shard_of(org: str, subject: str, partitions: int = PARTITIONS, shards: int = SHARDS) -> int:
    """Which shard holds the partition of a customer's subject (`id:…` or `ext:…`)."""
    return partition_of(subject_key(org, subject).encode(), partitions) % shards


def _on_shard(org: str, shard: int) -> str:
    """An external customer id whose customer is on `shard`."""
    return next(f"on-{i}" for i in range(1000) if _shard_of(org, f"ext:on-{i}") == shard)


def _apart(org: str) -> list[str]:
    """Two external customer ids of customers on different shards."""
    found: dict[int, str] = {}
    for i in range(100):
        found.setdefault(_shard_of(org, f"ext:apart-{i}"), f"apart-{i}")
        if len(found) == 2:
            return list(found.values())
    raise AssertionError("no two shards")


def _system(client: httpx.Client, **params: str) -> int:
    """The system events the asked core holds (not merged with the other shards')."""
    query = {"source": "system", "limit": 1, **params}
    found = _ok(client.get("/v1/events/", params=query, headers={ROUTED_HEADER: "1"}))
    return int(found["pagination"]["total_count"])


def _token(pipeline: Pipeline, organization: str) -> str:
    """A new token of a new `organization`, published on the control topic (`meterline token
    create --kafka`), as it prints it."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        command = ["token", "create", "--org", organization, "--data-dir", str(pipeline.data_dir)]
        topic = ("--kafka", pipeline.broker.bootstrap, "--no-idempotence")
        assert cli.main([*command, *topic]) == 0
    return printed.getvalue().strip()


def _replica_of(tmp_path: Path, leader: ServedCore, args: tuple[str, ...]) -> ServedCore:
    """A replica of `leader`'s shard, started from a snapshot the leader takes as it serves."""
    snapshots, data_dir = tmp_path / "snapshots", tmp_path / "replica"
    assert cli.main(["backup", "--data-dir", str(leader.data_dir), "--to", str(snapshots)]) == 0
    assert cli.main(["restore", "--from", str(snapshots), "--data-dir", str(data_dir)]) == 0
    replica = ServedCore(data_dir, *args, "--shard", f"0/{SHARDS}", "--replica", dev_token=False)
    replica.start()
    return replica


class Workload:
    """A seeded random mix of writes and events: customers made with an external id or
    without (some after events named them), events naming a customer by its id or by an
    external id (some with an `external_id`, some batches sent again whole: a retry), credits
    and new meters. Nothing whose outcome depends on how the two topics interleave (holds,
    resets, alerts): each deployment's journal interleaves them its own way."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.meters: list[str] = []
        self.customers: list[str] = []  # made through the API
        self.externals: list[str] = []  # named by events or given to a customer
        self.given: list[str] = []  # external ids given to a customer
        self.sent: list[list[dict[str, Any]]] = []
        self.distinct: set[str] = set()  # the events one shard keeps (credits' included)

    def step(self, one: httpx.Client, edge: httpx.Client, shards: list[httpx.Client]) -> None:
        """One write through the one-shard core (the control topic is both deployments'), or
        events through the edge. A customer is known to every shard before events name its
        id: a shard refuses (dead-letters) an event naming an id it has no customer for."""
        rng = self.rng
        kinds = ["events", "events", "events", "customer", "credit", "meter", "retry"]
        kind = rng.choice(kinds) if self.meters else "meter"
        if kind == "customer":
            free = [e for e in self.externals if e not in self.given]
            body = {"email": f"w{len(self.customers)}@x.org"}
            if free and rng.random() < 0.5:  # named by events already
                body["external_id"] = rng.choice(free)
            elif rng.random() < 0.5:
                body["external_id"] = self._external()
            made = _ok(one.post("/v1/customers/", json=body))["id"]
            path, here = f"/v1/customers/{made}", {ROUTED_HEADER: "1"}
            for shard in shards:
                wait_for(
                    "every shard to apply the new customer",
                    lambda s=shard: s.get(path, headers=here).is_success,
                )
            self.customers.append(made)
            if "external_id" in body:
                self.given.append(body["external_id"])
        elif kind == "credit" and (self.customers or self.given):
            ref = {"external_customer_id": rng.choice(self.given)} if self.given else {}
            if self.customers and (not ref or rng.random() < 0.5):
                ref = {"customer_id": rng.choice(self.customers)}
            body = {**ref, "meter_id": rng.choice(self.meters), "units": rng.randrange(1, 100)}
            body["external_id"] = f"wc-{rng.random()}"
            _ok(one.post("/v1/meter-credits/", json=body))
            self.distinct.add(body["external_id"])  # its system event
        elif kind == "meter":
            func = rng.choice(["sum", "count", "max", "unique", "avg"])
            aggregation = {"func": func, **({"property": "tokens"} if func != "count" else {})}
            body = {
                "name": f"workload meter {len(self.meters)}",
                "filter": {"conjunction": "and", "clauses": [], **self._filter()},
                "aggregation": aggregation,
            }
            self.meters.append(_ok(one.post("/v1/meters/", json=body))["id"])
        elif kind == "retry" and self.sent:
            self._send(edge, rng.choice(self.sent))
        else:
            events = [self._event(len(self.sent), i) for i in range(rng.randrange(1, 30))]
            self.sent.append(events)
            self._send(edge, events)

    def _external(self) -> str:
        self.externals.append(f"w{len(self.externals)}")
        return self.externals[-1]

    def _filter(self) -> dict[str, Any]:
        if self.rng.random() < 0.5:
            return {}
        name = self.rng.choice(["llm_call", "embed"])
        return {"clauses": [{"property": "name", "operator": "eq", "value": name}]}

    def _event(self, batch: int, i: int) -> dict[str, Any]:
        rng = self.rng
        if self.customers and rng.random() < 0.4:
            ref = {"customer_id": rng.choice(self.customers)}
        elif self.externals and rng.random() < 0.8:
            ref = {"external_customer_id": rng.choice(self.externals)}
        else:
            ref = {"external_customer_id": self._external()}
        tokens = rng.randrange(1, 500)
        event: dict[str, Any] = {
            "name": rng.choice(["llm_call", "embed", "search"]),
            **ref,
            "metadata": {
                "tokens": tokens,
                "_cost": {"amount": f"0.{tokens:03}", "currency": "usd"},
            },
        }
        if rng.random() < 0.8:  # a retry of it is then one event (its customer's shard's)
            event["external_id"] = f"w-{batch}-{i}"
        return event

    def _send(self, edge: httpx.Client, events: list[dict[str, Any]]) -> None:
        assert edge.post("/v1/events/ingest", json={"events": events}).is_success
        for event in events:
            self.distinct.add(event.get("external_id") or f"unkeyed-{len(self.distinct)}")


def _customer_reads(customer: str, meters: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """A customer's events and its quantities of two meters per day. (Its customer meters and
    state have times of applying: compared without them.)"""
    window = {**_wide(), "interval": "day"}
    reads: list[tuple[str, dict[str, Any]]] = [
        ("/v1/events/", {"customer_id": customer, "limit": 100})
    ]
    return reads + [
        (f"/v1/meters/{meter}/quantities", {**window, "customer_id": customer})
        for meter in meters[:2]
    ]


def _customers(one: httpx.Client, org: str) -> tuple[list[str], str]:
    """Customers made with an external id (`ext:` routes them) whose id's partition is on the
    other shard, so that events naming them by id are moved, and one whose is not; and a
    customer made without one (`id:` routes it) given the external id "late" after."""
    moving, staying = [], []
    for i in range(40):
        made = _ok(
            one.post("/v1/customers/", json={"email": f"n{i}@x.org", "external_id": f"n{i}"})
        )
        crossed = _shard_of(org, f"id:{made['id']}") != _shard_of(org, f"ext:n{i}")
        (moving if crossed else staying).append(made["id"])
        if len(moving) >= 3 and staying:
            break
    late = _ok(one.post("/v1/customers/", json={"email": "late@x.org"}))["id"]
    _ok(one.patch(f"/v1/customers/{late}", json={"external_id": "late"}))
    return [*moving[:3], staying[0]], late


MORE_METERS = [
    {**TOKENS_METER, "name": name, "aggregation": {"func": func, "property": "tokens"}}
    for name, func in (("distinct", "unique"), ("largest", "max"), ("mean", "avg"))
] + [{**TOKENS_METER, "name": "calls", "aggregation": {"func": "count"}}]


def _organization_reads(one: httpx.Client, meters: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every page of the event list, some pages of other sizes, orders and sources, the event
    names in two orders, the event types, the customers (with their first event's time), the
    holds, the credit plans,
    costs by name and by customer and name per day, and each meter's quantities over all
    customers (per day, and per customer combined by max)."""
    pages = _ok(one.get("/v1/events/", params={"limit": 100}))["pagination"]["max_page"]
    reads: list[tuple[str, dict[str, Any]]] = [
        ("/v1/events/", {"limit": 100, "page": page}) for page in range(1, pages + 1)
    ]
    reads += [
        ("/v1/events/", {"limit": 7, "page": 3, "sorting": "timestamp"}),
        ("/v1/events/", {"limit": 30, "page": 2, "name": "llm_call"}),
        ("/v1/events/names", {}),
        ("/v1/events/names", {"sorting": "occurrences", "limit": 1, "page": 1}),
        ("/v1/events/", {"limit": 10, "source": "system"}),
        ("/v1/event-types/", {"sorting": "label"}),
        ("/v1/customers/", {"limit": 100}),
        ("/v1/meter-holds/", {"limit": 100}),
        ("/v1/credit-plans/", {}),
        ("/v1/meter-holds/", {"limit": 1, "page": 2}),
    ]
    window = {**_wide(), "interval": "day"}
    costs = {k: v for k, v in window.items() if k != "interval"}
    reads += [
        ("/v1/costs/", {**costs, "group_by": "name"}),
        ("/v1/costs/", {**window, "group_by": ["customer", "name"], "limit": 3, "sort": "cost"}),
    ]
    for meter in meters:
        path = f"/v1/meters/{meter}/quantities"
        reads += [(path, window), (path, {**window, "customer_aggregation_function": "max"})]
    return reads


def _top_ups(client: httpx.Client) -> list[dict[str, Any]]:
    """Every top-up, newest first (two pages: shards merge them)."""
    first = _ok(client.get("/v1/top-ups/", params={"limit": 10}))
    rest = _ok(client.get("/v1/top-ups/", params={"limit": 10, "page": 2}))
    assert first["pagination"]["total_count"] <= 20, "more top-ups than two pages"
    return [*first["items"], *rest["items"]]


def _without_cause(top_ups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cause = ("created_at", "balance_before")
    return sorted(({k: v for k, v in t.items() if k not in cause} for t in top_ups), key=str)


def _answers(client: httpx.Client, reads: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [_ok_bytes(client.get(path, params=params)) for path, params in reads]


def _ok_bytes(answer: httpx.Response) -> bytes:
    assert answer.status_code == 200, answer.text
    return answer.content


def test_three_shards_answer_what_one_shard_answers(tmp_path: Path) -> None:
    """Every customer's events and ledger on one shard, whichever id they name (moved there
    when the edge keyed them by the other), with the one-shard core's quantities; after a
    seeded random workload, with a replica of a shard restored from its snapshot mid-way,
    every read asked of any shard is the one-shard core's."""
    with Pipeline(tmp_path / "one", partitions=PARTITIONS) as pipeline:
        assert pipeline.core is not None
        secret = ("--secret-file", str(pipeline.data_dir / "secret.key"))
        cores = [
            ServedCore(
                tmp_path / f"shard{i}",
                *(*pipeline.args(), *secret, "--shard", f"{i}/{SHARDS}"),
                dev_token=False,
            )
            for i in range(SHARDS)
        ]
        for core in cores:
            core.start()
        try:
            token = pipeline.token()
            meter = pipeline.create_meter()  # a record on the control topic: every shard's
            others = [pipeline.create_meter(m) for m in MORE_METERS]
            org = pipeline.organization_id()
            # Every customer's calls topped up where they are counted: on its shard alone.
            top_up = {"meter_id": others[-1], **TOP_UP}
            with pipeline.core.client(pipeline.token()) as http:
                assert http.post("/v1/top-up-rules/", json=top_up).status_code == 201
            with contextlib.ExitStack() as stack:
                one = stack.enter_context(pipeline.core.client(token))
                shards = [stack.enter_context(c.client(token)) for c in cores]
                edge = stack.enter_context(pipeline.edges[0].client(token))
                named, late = _customers(one, org)
                # Every shard has applied them (and the PATCH) itself: asked as routed, a shard
                # answers from its own state, not from the customer's shard. (A shard applies
                # an event naming a customer it has not applied yet as not found.)
                here = {ROUTED_HEADER: "1"}
                for shard in shards:
                    wait_for(
                        "every shard to apply the customers and the PATCH",
                        lambda s=shard: all(
                            (found := s.get(f"/v1/customers/{c}", headers=here)).status_code == 200
                            and (c != late or found.json()["external_id"] == "late")
                            for c in [*named, late]
                        ),
                    )
                distinct: set[str] = set()
                batches = list(usage_batches(42, 8, 50, "s"))  # cust_0..4: no customer made
                by_id = [
                    {
                        "name": "llm_call" if t % 3 else "embed",
                        "customer_id": c,
                        "metadata": {
                            "tokens": t + 1,
                            "_cost": {"amount": f"0.{t:02}7", "currency": "usd"},
                        },
                    }
                    for t, c in enumerate([*named, late] * 5)
                ]
                by_external = [
                    {"name": "llm_call", "external_customer_id": e, "metadata": {"tokens": 7}}
                    for e in ("late", "n0", "n1")
                ]
                for n, event in enumerate(by_id + by_external):
                    event["external_id"] = f"named-{n}"
                # Without an external id, nothing dedupes them: the one-shard core must leave
                # out the copies the shards move (records of another deployment's moves).
                unkeyed = [
                    {"name": "llm_call", "customer_id": c, "metadata": {"tokens": 100}}
                    for c in named
                ]
                # An event on each shard, whichever shards the ids above fell on (a shard
                # follows from the organization's id, new each run: at times one had none).
                covering = [
                    {
                        "name": "llm_call",
                        "external_customer_id": _on_shard(org, shard),
                        "external_id": f"covering-{shard}",
                        "metadata": {"tokens": 1},
                    }
                    for shard in range(SHARDS)
                ]
                for batch in [*batches, by_id, by_external, unkeyed, covering]:
                    assert edge.post("/v1/events/ingest", json={"events": batch}).is_success
                    distinct.update(e.get("external_id", str(id(e))) for e in batch)
                wait_for(
                    "the one-shard core to hold every event", lambda: _events(one) == len(distinct)
                )
                wait_for("the shards to hold its events", lambda: _held(*shards) == _events(one))
                assert min(_events(shard, here=True) for shard in shards) > 0
                expected_owner = {
                    **{f"cust_{i}": _shard_of(org, f"ext:cust_{i}") for i in range(5)},
                    **{
                        c: _shard_of(
                            org, f"ext:{_ok(one.get(f'/v1/customers/{c}'))['external_id']}"
                        )
                        for c in named
                    },
                    late: _shard_of(org, f"id:{late}"),
                }
                for customer, owner in expected_owner.items():
                    name = "customer_id" if customer in (*named, late) else "external_customer_id"
                    expected = _quantity(one, meter, **{name: customer})
                    assert expected > 0
                    held = [_quantity(c, meter, here=True, **{name: customer}) for c in shards]
                    assert held == [expected if i == owner else 0 for i in range(SHARDS)], customer
                    # Asked of any shard, answered by the customer's.
                    for shard in shards:
                        assert _quantity(shard, meter, **{name: customer}) == expected, customer
                for index, client in enumerate(shards):
                    digest = _ok(client.get("/v1/cluster/digest"))
                    owned = Shard(index, SHARDS).partitions(PARTITIONS)
                    assert sorted(int(p) for p in digest["events_offsets"]) == owned
                    # Each shard has its leader (as of its last heartbeat: within 2 s).
                    mine = (f"{index}/{SHARDS}", "leader")
                    wait_for(f"shard {index} to lead", lambda c=client, m=mine: _this(c) == m)
                    # The meter is every shard's: the control topic is applied whole.
                    assert _ok(client.get(f"/v1/meters/{meter}"))["id"] == meter
                moved = sum(_moved(c) for c in shards)
                assert moved >= 3 * 5  # the events naming the crossing customers by id, at least
                # Mid-way, a replica of shard 0 from a snapshot its leader takes while serving;
                # then a seeded random workload.
                replica = _replica_of(tmp_path, cores[0], (*pipeline.args(), *secret))
                cores.append(replica)
                through_replica = stack.enter_context(replica.client(token))
                # A second organization (its token on the control topic, which carries it to
                # every core and edge) runs a workload of its own between the first's steps,
                # with the same external ids.
                second = _token(pipeline, "second")
                two = stack.enter_context(pipeline.core.client(second))
                two_edge = stack.enter_context(pipeline.edges[0].client(second))
                two_shards = [stack.enter_context(c.client(second)) for c in cores[:SHARDS]]
                for client in (two, *two_shards):
                    wait_for(
                        "every core to take the second organization's token",
                        lambda c=client: c.get("/v1/meters/").is_success,
                    )
                empty = {"events": []}
                wait_for(
                    "the edge to take the second organization's token",
                    lambda: two_edge.post("/v1/events/ingest", json=empty).is_success,
                )
                workload, theirs = Workload(SEED), Workload(SEED + 1)
                workload.meters += [meter, *others]
                for step in range(STEPS):
                    workload.step(one, edge, shards)
                    if step % 3 == 0:
                        theirs.step(two, two_edge, two_shards)
                distinct |= workload.distinct
                wait_for(
                    "the one-shard core to hold the workload's events",
                    lambda: _events(one) == len(distinct),
                )
                wait_for("the shards to hold them", lambda: _held(*shards) == _events(one))
                wait_for(
                    "the one-shard core to hold the second organization's events",
                    lambda: _events(two) == len(theirs.distinct) > 0,
                )
                wait_for("the shards to hold them", lambda: _held(*two_shards) == _events(two))
                (state, reads), (again, reads_again) = _settled_together(shards[0], through_replica)
                _assert_same(state, again)
                assert reads_again == reads
                assert _events(one) == len(distinct)  # no copy of a moved event came in since
                # A credit and a hold sent to a shard that does not hold a customer are
                # decided by the one that does: it knows what the customer consumed.
                crossing = named[0]
                owner = shards[expected_owner[crossing]]
                other = shards[(expected_owner[crossing] + 1) % SHARDS]
                consumed = int(_quantity(one, meter, customer_id=crossing))
                credit = {"customer_id": crossing, "meter_id": meter, "external_id": "c"}
                made = other.post("/v1/meter-credits/", json={**credit, "units": consumed + 10})
                assert made.status_code == 201, made.text
                hold = {**credit, "external_id": "h", "units": 20}
                refused = other.post("/v1/meter-holds/", json=hold)
                assert refused.status_code == 409, refused.text  # 10 left, where its events are
                held_one = other.post("/v1/meter-holds/", json={**hold, "units": 5})
                assert held_one.status_code == 201, held_one.text
                # Applied by the customer's shard alone: the others apply the same records
                # but keep no ledger of that customer, so they fire no alert or webhook for it.
                # Asked itself (marked as routed), a shard refuses: the record is applied by
                # the customer's shard all the same, whose outcome is the answer (routing
                # step 3).
                own = {"customer_id": crossing, "meter_id": meter, "external_id": "r", "units": 1}
                elsewhere = other.post("/v1/meter-credits/", json=own, headers={ROUTED_HEADER: "1"})
                assert elsewhere.status_code == 421, elsewhere.text
                assert elsewhere.json()["error"] == "CustomerElsewhere"
                wait_for(  # "c", "r"
                    "the customer's shard to apply the two credits",
                    lambda: _system(owner, customer_id=crossing) == 2,
                )
                assert _system(other, customer_id=crossing) == 0
                # A hold by id, asked of any shard, is its customer's shard's.
                hold_id = held_one.json()["id"]
                for shard in shards:
                    assert _ok(shard.get(f"/v1/meter-holds/{hold_id}"))["status"] == "active"
                released = _ok(other.delete(f"/v1/meter-holds/{hold_id}"))
                assert released["status"] == "released"
                again_held = {**hold, "external_id": "h2", "units": 10}
                assert _ok(other.post("/v1/meter-holds/", json=again_held))["status"] == "active"
                # A credit plan is every shard's (its cycles counted alike); a cycle's reset and
                # credit are the customer's shard's.
                plan = {**credit, "external_id": "p", "units": 50, "interval": "month"}
                assert other.post("/v1/credit-plans/", json=plan).status_code == 201
                wait_for(
                    "the customer's shard to apply the plan's cycle",
                    lambda: _system(owner, customer_id=crossing) == 4,
                )
                assert _system(other, customer_id=crossing) == 0
                # (The one-shard core has applied those writes once it has their events.)
                wait_for(
                    "the one-shard core to apply those writes",
                    lambda: _system(one) == sum(_system(s) for s in shards) > 0,
                )
                # Organization-wide reads asked of any shard, and each customer's of one shard
                # (each in turn), are the one-shard core's answers, byte for byte.
                reads = _organization_reads(one, workload.meters)
                customers = [*named, late, *workload.customers]
                for shard in shards:
                    for (path, params), mine, merged in zip(
                        reads, _answers(one, reads), _answers(shard, reads), strict=True
                    ):
                        assert merged == mine, (path, params, mine[:2000], merged[:2000])
                for i, customer in enumerate(customers):
                    theirs = _customer_reads(customer, workload.meters)
                    for (path, params), mine, merged in zip(
                        theirs,
                        _answers(one, theirs),
                        _answers(shards[i % SHARDS], theirs),
                        strict=True,
                    ):
                        assert merged == mine, (path, params, mine[:2000], merged[:2000])
                for customer in customers:
                    state = [_ok(c.get(f"/v1/customers/{customer}/state")) for c in (one, *shards)]
                    assert all(s == state[1] for s in state[2:])  # the customer's shard's
                    # As the one-shard core's, but for times of applying (its own).
                    assert _figures(state[1]) == _figures(state[0])
                # Top-ups: the one-shard core's, each under its id, from any shard. Which of a
                # customer's events causes one (its created_at, balance_before) follows the
                # order its shard applies them in, and an event moved there comes later.
                made = [_top_ups(c) for c in (one, *shards)]
                assert all(answer == made[1] for answer in made[2:])
                assert _without_cause(made[1]) == _without_cause(made[0]) != []
                # Customer meters: the one-shard core's figures; their `modified_at` is each
                # core's time of applying (so is their order), the same from any shard.
                listed = [_customer_meters(c) for c in (one, *shards)]
                assert all(answer == listed[1] for answer in listed[2:])
                assert sorted(map(_balance, listed[1])) == sorted(map(_balance, listed[0]))
                assert listed[1] == sorted(listed[1], key=lambda m: _changed(m, -1))
                oldest = {"limit": 3, "page": 2, "sorting": "modified_at"}
                paged = [_ok(c.get("/v1/customer-meters/", params=oldest)) for c in shards]
                assert all(answer == paged[0] for answer in paged[1:])
                assert paged[0]["items"] == sorted(listed[1], key=lambda m: _changed(m, 1))[3:6]
                # An external id events name is not given to a customer made without it,
                # asked of any shard (the one holding those events decides) or of one.
                plain = _ok(one.post("/v1/customers/", json={"email": "plain@x.org"}))["id"]
                for client in (*shards, one):
                    wait_for(
                        "every core to apply the plain customer",
                        lambda c=client: c.get(f"/v1/customers/{plain}").is_success,
                    )
                    refused = client.patch(f"/v1/customers/{plain}", json={"external_id": "cust_0"})
                    assert refused.status_code == 409, refused.text
                    assert refused.json()["error"] == "ExternalIdInUse"
                too_deep = shards[0].get("/v1/events/", params={"page": 101, "limit": 100})
                assert too_deep.status_code == 422, too_deep.text
                assert too_deep.json()["detail"][0]["loc"] == ["query", "page"]
                # The live stream: organization-wide, every shard's changes (merged by the
                # shard asked); one customer's, its shard's stream sent on as it comes.
                o = expected_owner[crossing]
                merged = _watch(shards[(o + 1) % SHARDS], {}, crossing)
                routed_to = _watch(shards[(o + 2) % SHARDS], {"customer_id": crossing}, crossing)
                used = [{"name": "llm_call", "customer_id": crossing, "metadata": {"tokens": 3}}]
                assert edge.post("/v1/events/ingest", json={"events": used}).is_success
                for watched in (merged, routed_to):
                    change = next_of("the customer's change on the live stream", watched)
                    assert (
                        change["customer_id"] == crossing and change["meter_id"] in workload.meters
                    )
                # Dedupe is exact within a shard: the same external id in events of customers
                # on two shards is kept twice there, once by one shard.
                apart = _apart(org)
                twice = [
                    {"name": "llm_call", "external_customer_id": c, "external_id": "twice"}
                    for c in apart
                ]
                before = _events(one)
                for event in twice:  # apart: one request keeps the first of each external id
                    assert edge.post("/v1/events/ingest", json={"events": [event]}).is_success
                wait_for("the shards to keep both events", lambda: _held(*shards) == before + 2)
                wait_for("the one-shard core to keep one", lambda: _events(one) == before + 1)
        finally:
            for core in cores:
                core.stop()


def _core(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`meterline core` on `data_dir`, expected to exit at once."""
    command = [sys.executable, "-m", "aggregator.cli", "core", "--data-dir", str(data_dir)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=seconds_left())


def test_more_shards_than_partitions_or_another_shards_data_dir_is_refused(
    tmp_path: Path,
) -> None:
    with Pipeline(tmp_path / "one", partitions=PARTITIONS) as pipeline:
        too_many = _core(tmp_path / "s7", *pipeline.args(), "--shard", "7/8")
        # A data dir of shard 0/2 (it stored where its partitions start) as shard 1/2.
        with (
            ServedCore(tmp_path / "s0", *pipeline.args(), "--shard", "0/2") as shard,
            shard.client(shard.token) as client,
        ):
            wait_for("shard 0/2 to lead", lambda: _this(client) == ("0/2", "leader"))

        other = _core(tmp_path / "s0", *pipeline.args(), "--shard", "1/2")
    assert too_many.returncode == 2, too_many.stderr
    assert f"has {PARTITIONS} partitions, so at most {PARTITIONS} shards" in too_many.stderr
    assert other.returncode == 2, other.stderr
    assert "this data dir holds partitions 0, 2, 4 of meterline.events" in other.stderr
