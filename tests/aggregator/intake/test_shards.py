"""Shards (`--shard I/N`): beside a one-shard core, two shard cores on the same topics each apply
their own partitions of the events topic (p % 2 == I) and the whole control topic, with their
own journal and leader. Each customer's events are on one shard, where its quantities are the
one-shard core's; the shards' events add up to the one-shard core's, none on two. More shards
than partitions is refused at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.kafka import Shard
from meters.columnar import partition_of
from meters.records import key_prefixes
from tests.aggregator.intake.test_control_topic import _ok
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline, _wide, usage_batches
from tests.processes import wait_until

pytestmark = pytest.mark.slow

PARTITIONS = 6


def _events(client: httpx.Client) -> int:
    return int(_ok(client.get("/v1/events/", params={"limit": 1}))["pagination"]["total_count"])


def _quantity(client: httpx.Client, meter_id: str, **params: Any) -> float:
    found = _ok(client.get(f"/v1/meters/{meter_id}/quantities", params={**_wide(), **params}))
    return float(found["total"])


def _this(client: httpx.Client) -> tuple[str, str]:
    """The answering core's shard and role, as `GET /v1/cluster/` lists it."""
    [this] = [c for c in _ok(client.get("/v1/cluster/"))["items"] if c["this"]]
    return this["shard"], this["role"]


def test_two_shards_split_what_one_shard_applies(tmp_path: Path) -> None:
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
        for shard in shards:
            shard.start()
        try:
            token = pipeline.token()
            meter = pipeline.create_meter()  # a record on the control topic: every shard's
            org = pipeline.organization_id()
            distinct: set[str] = set()
            with pipeline.edges[0].client(token) as edge:
                for batch in usage_batches(42, 8, 50, "s"):
                    assert edge.post("/v1/events/ingest", json={"events": batch}).is_success
                    distinct.update(e["external_id"] for e in batch)
            with (
                pipeline.core.client(token) as one,
                shards[0].client(token) as first,
                shards[1].client(token) as second,
            ):
                wait_until(lambda: _events(one) == len(distinct), 60)
                for shard in (first, second):  # tokens reach a core on the control topic
                    wait_until(lambda s=shard: s.get("/v1/meters/").status_code == 200, 30)
                wait_until(lambda: _events(first) + _events(second) == _events(one), 60)
                assert min(_events(first), _events(second)) > 0
                _, by_external = key_prefixes(org)
                for customer in (f"cust_{i}" for i in range(5)):
                    owner = partition_of(f"{by_external}{customer}".encode(), PARTITIONS) % 2
                    expected = _quantity(one, meter, external_customer_id=customer)
                    assert expected > 0
                    found = [
                        _quantity(c, meter, external_customer_id=customer) for c in (first, second)
                    ]
                    assert found[owner] == expected and found[1 - owner] == 0, customer
                for index, client in enumerate((first, second)):
                    digest = _ok(client.get("/v1/cluster/digest"))
                    owned = Shard(index, 2).partitions(PARTITIONS)
                    assert sorted(int(p) for p in digest["events_offsets"]) == owned
                    # Each shard has its leader (as of its last heartbeat: within 2 s).
                    wait_until(lambda c=client, i=index: _this(c) == (f"{i}/2", "leader"), 10)
                    # The meter is every shard's: the control topic is applied whole.
                    assert _ok(client.get(f"/v1/meters/{meter}"))["id"] == meter
        finally:
            for shard in shards:
                shard.stop()


def test_more_shards_than_partitions_is_refused(tmp_path: Path) -> None:
    with Pipeline(tmp_path / "one", partitions=PARTITIONS) as pipeline:
        started = subprocess.run(
            [
                sys.executable,
                "-m",
                "aggregator.cli",
                "core",
                "--data-dir",
                str(tmp_path / "s7"),
                *pipeline.args(),
                "--shard",
                "7/8",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert started.returncode == 2, started.stderr
    assert f"has {PARTITIONS} partitions, so at most {PARTITIONS} shards" in started.stderr
