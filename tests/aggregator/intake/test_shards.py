"""Shards (`--shard I/N`): beside a one-shard core, two shard cores on the same topics each apply
their own partitions of the events topic (p % 2 == I) and the whole control topic, with their
own journal and leader. Each customer's events are on one shard, whichever of its ids they name
(rows keyed by the other are moved there), where its quantities are the one-shard core's; the
shards' events add up to the one-shard core's, none on two; a customer's reads, credits and
holds asked of either shard are its shard's answers, and its ledger is on that shard alone;
organization-wide reads (event lists, names, quantities over all customers, costs, holds,
customer meters) asked of either are the one-shard core's, byte for byte;
a replica of a shard holds its leader's state. An external id events name is not given to a
customer, whichever shard is asked. More shards than partitions, or a data dir of
another shard, is refused at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.api import fan_out
from aggregator.api.shard_routing import ROUTED_HEADER
from ingest.kafka import Shard
from meters.columnar import partition_of
from meters.records import subject_key
from tests.aggregator.intake.test_control_topic import _assert_same, _ok, _settled_together
from tests.inprocess import ServedCore
from tests.pipeline import TOKENS_METER, Pipeline, _wide, usage_batches
from tests.processes import wait_until

pytestmark = pytest.mark.slow

PARTITIONS = 6


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


def _shard_of(org: str, subject: str) -> int:
    """Which of 2 shards holds the partition of a customer's subject (`id:…` or `ext:…`)."""
    return partition_of(subject_key(org, subject).encode(), PARTITIONS) % 2


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


def _answers(client: httpx.Client, reads: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [_ok_bytes(client.get(path, params=params)) for path, params in reads]


def _ok_bytes(answer: httpx.Response) -> bytes:
    assert answer.status_code == 200, answer.text
    return answer.content


def test_two_shards_split_what_one_shard_applies(tmp_path: Path) -> None:
    """Every customer's events on one shard, whichever id they name (moved there when the
    edge keyed them by the other), with the one-shard core's quantities."""
    with Pipeline(tmp_path / "one", partitions=PARTITIONS) as pipeline:
        assert pipeline.core is not None
        secret = ("--secret-file", str(pipeline.data_dir / "secret.key"))
        shards = [
            ServedCore(
                tmp_path / f"shard{i}",
                *(*pipeline.args(), *secret, "--shard", f"{i}/2"),
                dev_token=False,
            )
            for i in range(2)
        ]
        # And a replica of shard 0: it leaves out the rows its leader moved, as the journal says.
        replica = ServedCore(
            tmp_path / "replica0",
            *(*pipeline.args(), *secret, "--shard", "0/2", "--replica"),
            dev_token=False,
        )
        shards.append(replica)
        for shard in shards:
            shard.start()
        try:
            token = pipeline.token()
            meter = pipeline.create_meter()  # a record on the control topic: every shard's
            others = [pipeline.create_meter(m) for m in MORE_METERS]
            org = pipeline.organization_id()
            with (
                pipeline.core.client(token) as one,
                shards[0].client(token) as first,
                shards[1].client(token) as second,
                replica.client(token) as through_replica,
                pipeline.edges[0].client(token) as edge,
            ):
                named, late = _customers(one, org)
                for shard in (first, second):  # every shard has applied them (and the PATCH)
                    wait_until(
                        lambda s=shard: (
                            s.get(f"/v1/customers/{late}").status_code == 200
                            and s.get(f"/v1/customers/{late}").json()["external_id"] == "late"
                        ),
                        30,
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
                for batch in [*batches, by_id, by_external, unkeyed]:
                    assert edge.post("/v1/events/ingest", json={"events": batch}).is_success
                    distinct.update(e.get("external_id", str(id(e))) for e in batch)
                wait_until(lambda: _events(one) == len(distinct), 60)
                wait_until(lambda: _held(first, second) == _events(one), 60)
                assert min(_events(first, here=True), _events(second, here=True)) > 0
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
                    held = [
                        _quantity(c, meter, here=True, **{name: customer}) for c in (first, second)
                    ]
                    assert held[owner] == expected and held[1 - owner] == 0, customer
                    # Asked of any shard, answered by the customer's.
                    for shard in (first, second):
                        assert _quantity(shard, meter, **{name: customer}) == expected, customer
                for customer in (*named, late):
                    state = [
                        _ok(c.get(f"/v1/customers/{customer}/state")) for c in (one, first, second)
                    ]
                    assert state[1] == state[2]  # both the customer's shard's answer
                    # As the one-shard core's, but for times of applying (its own).
                    assert _figures(state[1]) == _figures(state[0]) != []
                for index, client in enumerate((first, second)):
                    digest = _ok(client.get("/v1/cluster/digest"))
                    owned = Shard(index, 2).partitions(PARTITIONS)
                    assert sorted(int(p) for p in digest["events_offsets"]) == owned
                    # Each shard has its leader (as of its last heartbeat: within 2 s).
                    wait_until(lambda c=client, i=index: _this(c) == (f"{i}/2", "leader"), 10)
                    # The meter is every shard's: the control topic is applied whole.
                    assert _ok(client.get(f"/v1/meters/{meter}"))["id"] == meter
                moved = sum(_moved(c) for c in (first, second))
                assert moved >= 3 * 5  # the events naming the crossing customers by id, at least
                (state, reads), (again, reads_again) = _settled_together(first, through_replica)
                _assert_same(state, again)
                assert reads_again == reads
                assert _events(one) == len(distinct)  # no copy of a moved event came in since
                # A credit and a hold sent to the shard that does not hold a customer are
                # decided by the one that does: it knows what the customer consumed.
                crossing = named[0]
                owner = (first, second)[expected_owner[crossing]]
                other = (first, second)[1 - expected_owner[crossing]]
                consumed = int(_quantity(one, meter, customer_id=crossing))
                credit = {"customer_id": crossing, "meter_id": meter, "external_id": "c"}
                made = other.post("/v1/meter-credits/", json={**credit, "units": consumed + 10})
                assert made.status_code == 201, made.text
                hold = {**credit, "external_id": "h", "units": 20}
                refused = other.post("/v1/meter-holds/", json=hold)
                assert refused.status_code == 409, refused.text  # 10 left, where its events are
                held = other.post("/v1/meter-holds/", json={**hold, "units": 5})
                assert held.status_code == 201, held.text
                # Applied by the customer's shard alone: the other applies the same records
                # but keeps no ledger of that customer, so it fires no alert or webhook for it.
                # Asked itself (marked as routed), it refuses: the record is applied by the
                # customer's shard all the same, whose outcome is the answer (routing step 3).
                own = {"customer_id": crossing, "meter_id": meter, "external_id": "r", "units": 1}
                elsewhere = other.post("/v1/meter-credits/", json=own, headers={ROUTED_HEADER: "1"})
                assert elsewhere.status_code == 421, elsewhere.text
                assert elsewhere.json()["error"] == "CustomerElsewhere"

                def _system(client: httpx.Client, **params: str) -> int:
                    query = {"source": "system", "limit": 1, **params}
                    found = _ok(
                        client.get("/v1/events/", params=query, headers={ROUTED_HEADER: "1"})
                    )
                    return int(found["pagination"]["total_count"])

                wait_until(lambda: _system(owner, customer_id=crossing) == 2, 30)  # "c", "r"
                assert _system(other, customer_id=crossing) == 0
                assert _system(first) + _system(second) == _system(one) > 0
                # A hold by id, asked of either shard, is its customer's shard's.
                hold_id = held.json()["id"]
                for shard in (first, second):
                    assert _ok(shard.get(f"/v1/meter-holds/{hold_id}"))["status"] == "active"
                released = _ok(other.delete(f"/v1/meter-holds/{hold_id}"))
                assert released["status"] == "released"
                again = _ok(
                    other.post("/v1/meter-holds/", json={**hold, "external_id": "h2", "units": 10})
                )
                assert again["status"] == "active"  # 5 were available before the release
                # A credit plan is every shard's (its cycles counted alike); a cycle's reset and
                # credit are the customer's shard's.
                plan = {**credit, "external_id": "p", "units": 50, "interval": "month"}
                assert other.post("/v1/credit-plans/", json=plan).status_code == 201
                wait_until(lambda: _system(owner, customer_id=crossing) == 4, 30)
                assert _system(other, customer_id=crossing) == 0
                # Organization-wide reads asked of either shard merge both shards' parts into
                # the one-shard core's answers, byte for byte: the credit's system event and
                # the holds listed once.
                reads = _organization_reads(one, [meter, *others])
                wait_until(lambda: _answers(one, reads) == _answers(first, reads), 30)
                expected = _answers(one, reads)
                for shard in (first, second):
                    for (path, params), mine, merged in zip(
                        reads, expected, _answers(shard, reads), strict=True
                    ):
                        assert merged == mine, (path, params)
                # Customer meters: the one-shard core's figures; their `modified_at` is each
                # core's time of applying (so is their order), the same from either shard.
                listed = [
                    _ok(c.get("/v1/customer-meters/", params={"limit": 100}))
                    for c in (one, first, second)
                ]
                assert listed[1] == listed[2]
                assert listed[1]["pagination"] == listed[0]["pagination"]
                assert sorted(map(_balance, listed[1]["items"])) == sorted(
                    map(_balance, listed[0]["items"])
                )
                items = listed[1]["items"]
                assert items == sorted(items, key=lambda m: _changed(m, -1))
                oldest = {"limit": 3, "page": 2, "sorting": "modified_at"}
                paged = [_ok(c.get("/v1/customer-meters/", params=oldest)) for c in (first, second)]
                assert paged[0] == paged[1]
                assert paged[0]["items"] == sorted(items, key=lambda m: _changed(m, 1))[3:6]
                # An external id events name is not given to a customer made without it,
                # asked of either shard (the one holding those events decides) or of one.
                plain = _ok(one.post("/v1/customers/", json={"email": "plain@x.org"}))["id"]
                for client in (first, second, one):
                    wait_until(lambda c=client: c.get(f"/v1/customers/{plain}").is_success, 30)
                    refused = client.patch(f"/v1/customers/{plain}", json={"external_id": "cust_0"})
                    assert refused.status_code == 409, refused.text
                    assert refused.json()["error"] == "ExternalIdInUse"
                too_deep = first.get("/v1/events/", params={"page": 101, "limit": 100})
                assert too_deep.status_code == 422, too_deep.text
                assert too_deep.json()["detail"][0]["loc"] == ["query", "page"]
        finally:
            for shard in shards:
                shard.stop()


def _core(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`meterline core` on `data_dir`, expected to exit at once."""
    command = [sys.executable, "-m", "aggregator.cli", "core", "--data-dir", str(data_dir)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


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
            wait_until(lambda: _this(client) == ("0/2", "leader"), 30)
        other = _core(tmp_path / "s0", *pipeline.args(), "--shard", "1/2")
    assert too_many.returncode == 2, too_many.stderr
    assert f"has {PARTITIONS} partitions, so at most {PARTITIONS} shards" in too_many.stderr
    assert other.returncode == 2, other.stderr
    assert "this data dir holds partitions 0, 2, 4 of meterline.events" in other.stderr
