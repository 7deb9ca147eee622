"""The Kafka pipeline end to end: a Tansu broker, ingest edges, a core (a process where it is
killed). The tests that only need a running pipeline share one per partition count, each in
an organization of its own.

The oracle is a plain-Python fold over the events sent (`tests.pipeline.Oracle`)."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaProducer

from meters import columnar
from meters.events import COLUMNS, Event, EventRules, parse_ingest_body, to_table
from meters.records import key_prefixes, record_key, record_value
from meters.times import now_us
from tests.deadline import seconds_left, wait_for
from tests.pipeline import (
    Headers,
    Oracle,
    Pipeline,
    produce_raw,
    send_until_accepted,
    topic_records,
    usage_batches,
)

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline (3 partitions) for the tests that need a running one."""
    with Pipeline(tmp_path_factory.mktemp("shared")) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def one_partition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline of one partition: records are applied (or dead-lettered) in their order."""
    with Pipeline(tmp_path_factory.mktemp("one"), partitions=1) as pipeline:
        yield pipeline


def _assert_matches_fold(pipeline: Pipeline, meter_id: str, oracle: Oracle) -> None:
    pipeline.wait_for_events(len(oracle.events))
    expected = oracle.tokens_by_customer()
    for customer, tokens in expected.items():
        assert pipeline.quantity(meter_id, external_customer_id=customer) == tokens, customer
    assert pipeline.quantity(meter_id) == sum(expected.values())


def test_events_through_two_edges_equal_the_fold(tmp_path: Path) -> None:
    with Pipeline(tmp_path, edges=2, workers=1) as pipeline:
        meter_id = pipeline.create_meter()
        oracle = Oracle()
        clients = [edge.client(pipeline.token()) for edge in pipeline.edges]
        for i, batch in enumerate(usage_batches(seed=11, batches=20, size=200, tag="two")):
            send_until_accepted(clients[i % 2], batch)  # a 503 is retried, as clients do
            oracle.add(batch)
        for client in clients:
            client.close()
        _assert_matches_fold(pipeline, meter_id, oracle)


@pytest.mark.parametrize("seed", [101, 202])
def test_core_killed_at_random_points_loses_and_doubles_nothing(tmp_path: Path, seed: int) -> None:
    print(f"seed {seed}")  # the kill times follow from it
    rng = random.Random(seed)
    with Pipeline(tmp_path, edges=1, processes=True) as pipeline:
        meter_id = pipeline.create_meter()
        oracle = Oracle()
        batches = list(usage_batches(seed=seed, batches=40, size=250, tag=f"kill{seed}"))
        done = threading.Event()

        def load() -> None:
            with pipeline.edges[0].client(pipeline.token()) as client:
                for batch in batches:
                    send_until_accepted(client, batch)
                    oracle.add(batch)
                    time.sleep(0.02)  # pacing the load
            done.set()

        sender = threading.Thread(target=load)
        sender.start()
        kills = 0
        while not done.is_set() and kills < 3:
            time.sleep(rng.uniform(0.3, 1.5))  # the point: a random moment of the load
            pipeline.restart_core()  # SIGKILL, then a new process on the same data dir
            kills += 1
        sender.join(seconds_left())

        assert done.is_set() and kills >= 1
        _assert_matches_fold(pipeline, meter_id, oracle)


def test_poison_records_are_dead_lettered_and_the_partition_moves_on(
    one_partition: Pipeline,
) -> None:
    pipeline = one_partition.tenant("poison")
    meter_id = pipeline.create_meter()
    assert pipeline.core is not None
    org = pipeline.organization_id()
    good = {"organization_id": org, "name": "call", "external_customer_id": "c1"}
    poison: list[bytes | None] = [
        b"{not json",
        b"[]",
        orjson.dumps({**good, "organization_id": "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d11"}),
        orjson.dumps({**good, "name": ""}),
        orjson.dumps(
            {
                "organization_id": org,
                "name": "call",
                "customer_id": "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d12",
            }
        ),
        orjson.dumps({**good, "metadata": {"tokens": 1, "pad": "x" * 2_000_000}}),
        None,
    ]
    valid = [
        orjson.dumps({**good, "external_id": f"ok-{i}", "metadata": {"tokens": i}})
        for i in range(1, 6)
    ]
    dead = _produce_and_read_dead_letters(pipeline, [*poison, *valid], 7)
    assert [d[0] for d in dead] == list(range(7))  # each poison record, by offset
    reasons = [d[1] for d in dead]
    assert reasons[0].startswith("value: not JSON")
    assert reasons[1] == "value: not a JSON object"
    assert reasons[2] == "organization_id: no such organization"
    assert reasons[3].startswith("name:")
    assert reasons[4] == "customer_id: Customer not found."
    assert "byte limit" in reasons[5]
    assert reasons[6].startswith("value: missing")
    pipeline.wait_for_events(5)
    assert pipeline.quantity(meter_id) == 15


def test_poison_columnar_records_go_whole_or_row_by_row(one_partition: Pipeline) -> None:
    """A columnar record that cannot be read goes to the dead-letter topic whole; a row that
    breaks a rule goes alone, as a JSON record, and the record's other rows apply."""
    pipeline = one_partition.tenant("poison-columnar")
    meter_id = pipeline.create_meter()
    org = pipeline.organization_id()
    now = now_us()

    def rows(*tokens: int) -> pa.Table:
        return to_table(
            [
                Event("call", now - 1000, None, "c1", f"col-{t}", None, None, {"tokens": t}, None)
                for t in tokens
            ]
        )

    def record(events: pa.Table, organization: str = org) -> columnar.Record:
        encoded = columnar.encode(events, organization, now, partitions=1)
        assert len(encoded.records) == 1
        return encoded.records[0]

    one_bad_row = rows(1, 2, 3).to_pylist()
    one_bad_row[1]["metadata"] = '{"a.b": 1}'
    unknown_customer = rows(4).to_pylist()
    unknown_customer[0].update(
        external_customer_id=None, customer_id="5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d12"
    )
    truncated = record(rows(100))
    other_schema = record(rows(100))
    other_version = record(rows(100))
    records = [
        truncated,
        other_schema,
        other_version,
        record(rows(100), "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d11"),  # no such organization
        record(pa.Table.from_pylist(one_bad_row, schema=COLUMNS)),
        record(pa.Table.from_pylist(unknown_customer, schema=COLUMNS)),
        record(rows(5, 6)),
    ]
    values: list[bytes | None] = [r.value for r in records]
    headers = [r.headers for r in records]
    values[0] = truncated.value[:-20]
    values[1] = _other_schema()
    headers[1] = [
        (k, str(len(values[1] or b"")).encode() if k == columnar.H_SIZE else v)
        for k, v in [*other_schema.headers]
        if k != columnar.H_COMPRESSION
    ] + [(columnar.H_COMPRESSION, b"none")]
    headers[2] = [(k, b"2" if k == columnar.H_SCHEMA else v) for k, v in other_version.headers]
    dead = _produce_and_read_dead_letters(pipeline, values, 6, headers)
    assert [offset for offset, _ in dead] == [0, 1, 2, 3, 4, 5]
    reasons = [reason for _, reason in dead]
    assert reasons[0].startswith("value: not a readable zstd Arrow IPC stream")
    assert reasons[1].startswith("value: schema is not version 1's")
    assert reasons[2].startswith("meterline.schema: version b'2'")
    assert reasons[3] == "row 0: organization_id: no such organization"
    assert reasons[4].startswith('row 1: metadata: a key is empty, too long or holds a "."')
    assert reasons[5] == "row 0: customer_id: Customer not found."
    pipeline.wait_for_events(4)
    assert pipeline.quantity(meter_id) == 1 + 3 + 5 + 6


def test_a_topic_of_json_records_then_columnar_records_applies_both(shared: Pipeline) -> None:
    """An upgrade: the topic holds what the previous edges wrote (one JSON record per event,
    `meters.records`) when edges that write columnar records start; the core applies both, the
    older first, and an external_id sent in both formats counts once."""
    pipeline = shared.tenant("upgrade")
    meter_id = pipeline.create_meter()
    org = pipeline.organization_id()
    old = [
        {
            "name": "call",
            "external_customer_id": f"c{i % 3}",
            "external_id": f"e-{i}",
            "metadata": {"tokens": i},
        }
        for i in range(1, 21)
    ]
    received = now_us()
    parsed = parse_ingest_body({"events": old}, now=received, rules=EventRules())
    asyncio.run(_produce_json(pipeline, org, parsed, received))
    new = [
        {
            "name": "call",
            "external_customer_id": f"c{i % 3}",
            "external_id": f"e-{i}",
            "metadata": {"tokens": i},
        }
        for i in range(15, 41)  # 15..20 repeat old external_ids
    ]
    with pipeline.edges[0].client(pipeline.token()) as client:
        send_until_accepted(client, new)
    pipeline.wait_for_events(40)
    assert pipeline.quantity(meter_id) == sum(range(1, 41))


async def _produce_json(
    pipeline: Pipeline, organization_id: str, events: list[Event], received: int
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    await producer.start()
    try:
        for event in events:
            key = record_key(organization_id, event)
            await producer.send_and_wait(
                "meterline.events",
                record_value(event, organization_id, received),
                key=key,
                partition=columnar.partition_of(key, pipeline.partitions),
            )
    finally:
        await producer.stop()


def _other_schema() -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"name": ["call"], "tokens": [1]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def test_an_event_dated_30_days_ago_is_applied(shared: Pipeline) -> None:
    pipeline = shared.tenant("late")
    meter_id = pipeline.create_meter()
    day = (datetime.now(UTC) - timedelta(days=30)).replace(hour=12, minute=0, second=0)
    event = {
        "name": "late",
        "external_customer_id": "c1",
        "external_id": "late-1",
        "timestamp": day.isoformat(),
        "metadata": {"tokens": 42},
    }
    with pipeline.edges[0].client(pipeline.token()) as client:
        send_until_accepted(client, [event])
    pipeline.wait_for_events(1)
    window = {
        "start_timestamp": day.replace(hour=0).isoformat(),
        "end_timestamp": day.replace(hour=23, minute=59).isoformat(),
        "interval": "day",
    }
    assert pipeline.quantity(meter_id, **window) == 42


def _produce_and_read_dead_letters(
    pipeline: Pipeline,
    values: list[bytes | None],
    expected: int,
    headers: list[Headers] | None = None,
) -> list[tuple[int, str]]:
    """Write `values` (with `headers`) straight to the events topic, then read the dead-letter
    topic: (offset among `values`, reason) of each dead letter of theirs; a columnar record's
    dead row reads (offset, "row N: reason")."""
    bootstrap = pipeline.broker.bootstrap
    records = [(headers[i] if headers else [], v) for i, v in enumerate(values)]
    offsets = asyncio.run(produce_raw(bootstrap, records))

    def theirs() -> list[tuple[int, str]]:
        found = []
        for record in asyncio.run(topic_records(bootstrap, "meterline.events.dead")):
            header = {k: v.decode() for k, v in record.headers}
            offset = int(header["meterline.offset"])
            if not offsets[0] <= offset <= offsets[-1]:
                continue  # another test's
            reason = header["meterline.reason"]
            if "meterline.row" in header:
                reason = f"row {header['meterline.row']}: {reason}"
                assert orjson.loads(record.value or b"")["name"]  # the row, as a JSON record
            found.append((offset - offsets[0], reason))
        return sorted(found)

    wait_for(f"{expected} dead letters", lambda: len(theirs()) >= expected)
    return theirs()


def test_the_docs_columnar_producer_works_as_written(shared: Pipeline) -> None:
    """The columnar producer of docs/guides/kafka-producers.md (the SDK's helper, in a `py` block:
    shown, not run by the docs test, which has no broker), run as pasted but for the broker
    address and the organization id. Its JSON producers are run from the files it shows, by
    tests/ingest/test_producer_examples.py."""
    page = (Path(__file__).parents[3] / "docs" / "guides" / "kafka-producers.md").read_text()
    blocks = re.findall(r"^```py\n(.*?)^```", page, re.M | re.S)
    (example,) = [block for block in blocks if "from ingest.sdk.kafka import records" in block]
    pipeline = shared.tenant("docs-producer")
    code = example.replace("127.0.0.1:9092", pipeline.broker.bootstrap)
    code = re.sub(r'ORG_ID = "[0-9a-f-]+"', f'ORG_ID = "{pipeline.organization_id()}"', code)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds_left()
    )
    assert done.returncode == 0, done.stderr
    pipeline.wait_for_events(1000)


def test_a_child_on_another_partition_before_its_parent_resolves(shared: Pipeline) -> None:
    """Kafka mode: the child's record is applied first, from another partition than its
    parent's; the parent link resolves when the parent is applied."""
    pipeline = shared.tenant("parents")
    org = pipeline.organization_id()
    prefix = key_prefixes(org)[1]

    def partition(customer: str) -> int:
        return columnar.partition_of(f"{prefix}{customer}".encode(), pipeline.partitions)

    customers = [f"c{i}" for i in range(20)]
    child_customer = customers[0]
    parent_customer = next(c for c in customers if partition(c) != partition(child_customer))
    assert pipeline.core is not None
    token = pipeline.token()
    with pipeline.edges[0].client(token) as edge, pipeline.core.client(token) as core:

        def send(event: dict[str, str]) -> None:
            send_until_accepted(edge, [event])

        def listed(name: str) -> dict[str, Any]:
            items = core.get("/v1/events/", params={"name": name}).json()["items"]
            assert len(items) == 1
            return dict(items[0])

        send({"name": "child", "external_customer_id": child_customer, "parent_id": "p1"})
        pipeline.wait_for_events(1)
        assert listed("child")["parent_id"] is None
        send({"name": "parent", "external_customer_id": parent_customer, "external_id": "p1"})
        pipeline.wait_for_events(2)
        parent = listed("parent")
        assert listed("child")["parent_id"] == parent["id"]
        assert parent["child_count"] == 1
        roots = core.get("/v1/events/", params={"depth": 0}).json()["items"]
        assert [e["name"] for e in roots] == ["parent"]


def test_a_refused_token_says_tokens_are_on_the_control_topic(shared: Pipeline) -> None:
    """Kafka mode's 401s, of a core and of an edge, say where its tokens are (the data dir's
    auth.sqlite3 is the embedded pipeline's: `test_auth_and_isolation`)."""
    assert shared.core is not None
    for server in (shared.core, shared.edges[0]):
        with server.client("mlt_oat_not_a_token") as client:
            refused = client.post("/v1/events/ingest", json={"events": []})
        assert refused.status_code == 401, refused.text
        said = refused.json()["error_description"]
        assert "on its control topic" in said and "meterline token create" in said, said
        assert "--kafka BOOTSTRAP" in said
