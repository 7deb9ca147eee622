"""`meterline dead-letters list|show|replay` against a real broker and a Kafka-mode core: a
record refused for an unknown customer is listed, shown, and replayed with a corrected value;
replayed twice, it is applied once."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.deadline import wait_for
from tests.inprocess import run_cli
from tests.pipeline import Pipeline, dead_letters

pytestmark = pytest.mark.processes

APPLIED = "meterline_consumer_organization_applied_events_total"


def _cli(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """`meterline dead-letters ARGS` with METERLINE_KAFKA naming the pipeline's broker."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("METERLINE_KAFKA", pipeline.broker.bootstrap)
        return run_cli("dead-letters", *args)


def _applied(pipeline: Pipeline, organization_id: str) -> int:
    assert pipeline.core is not None
    text = httpx.get(f"{pipeline.core.url}/metrics", timeout=10).text
    found = re.search(rf'^{APPLIED}{{organization_id="{organization_id}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else 0


async def _produce(bootstrap: str, value: dict[str, object]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait("meterline.events", json.dumps(value).encode())
    finally:
        await producer.stop()


def test_list_show_and_replay_twice_applies_once(tmp_path: Path) -> None:
    with Pipeline(tmp_path, edges=0) as pipeline:
        org = pipeline.organization_id()
        meter = pipeline.create_meter()
        refused = {
            "organization_id": org,
            "name": "api_call",
            "customer_id": "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d12",  # no such customer
            "external_id": "replayed-1",
            "metadata": {"tokens": 7},
        }
        asyncio.run(_produce(pipeline.broker.bootstrap, refused))
        asyncio.run(dead_letters(pipeline.broker.bootstrap, expected=1))
        listed = _cli(pipeline, "list", "--organization", org, "--reason", "Customer not found")
        assert listed.returncode == 0, listed.stderr
        (line,) = listed.stdout.splitlines()
        where = line.split()[0]
        assert org in line and "customer_id: Customer not found." in line
        assert _cli(pipeline, "list", "--reason", "no such reason").returncode == 1

        shown = _cli(pipeline, "show", where)
        assert json.loads(shown.stdout) == refused
        assert "meterline.reason: customer_id: Customer not found." in shown.stderr

        fixed = {**refused, "external_customer_id": "cust_1"}
        del fixed["customer_id"]
        (tmp_path / "fixed.json").write_text(json.dumps(fixed))
        before = _applied(pipeline, org)
        for n in (1, 2):  # twice: deduplicated by external_id at the core
            done = _cli(
                pipeline,
                "replay",
                where,
                "--value-file",
                str(tmp_path / "fixed.json"),
                "--no-idempotence",
            )
            assert done.returncode == 0, done.stderr
            wait_for(
                "the core to apply the replayed record",
                lambda n=n: _applied(pipeline, org) == before + n,
            )

        assert pipeline.quantity(meter) == 7
        assert pipeline.stored_events() == 1
