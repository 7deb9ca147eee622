"""A Kafka pipeline of real processes for tests: a Tansu broker, one core, N ingest edges on a
shared data dir; plus the plain-Python oracle the tests compare quantities with."""

from __future__ import annotations

import asyncio
import copy
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from tests.deadline import seconds_left, wait_for, waited_too_long
from tests.inprocess import ServedCore
from tests.processes import Broker, MeterlineServer, Server, edge_token, new_org_token

# One sum meter the oracle folds: tokens per customer.
TOKENS_METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


def _wide() -> dict[str, str]:
    """A window around now that every test event falls in (back-dated ones included)."""
    now = datetime.now(UTC)
    return {
        "start_timestamp": (now - timedelta(days=90)).isoformat(),
        "end_timestamp": (now + timedelta(days=1)).isoformat(),
        "interval": "month",
    }


class Pipeline:
    """A broker, a core and `edges` ingest edges on one data dir. The core and the edges are
    served from threads of the test process, or, with `processes`, are real processes: for
    tests that kill them or time their answers (a thread shares the test's interpreter)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        edges: int = 1,
        partitions: int = 3,
        deadline_seconds: float = 5.0,
        workers: int = 0,
        processes: bool = False,
        core_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.broker = Broker()
        self._edges = edges
        self._stack = ExitStack()
        self.core: Server | None = None
        self.edges: list[Server] = []
        self.partitions = partitions
        self.deadline_seconds = deadline_seconds
        self.workers = workers
        self.processes = processes
        self.core_args = core_args
        self._token: str | None = None  # a `tenant`'s

    def args(self) -> tuple[str, ...]:
        return (
            "--kafka",
            self.broker.bootstrap,
            "--no-idempotence",  # Tansu has no idempotent producer
            "--partitions",
            str(self.partitions),
            "--validation-workers",
            str(self.workers),
            "--deadline-seconds",
            str(self.deadline_seconds),
            # A killed core's successor waits this long for the group to let the dead one go.
            "--consumer-session-timeout-seconds",
            "4",
        )

    def __enter__(self) -> Self:
        self._stack.enter_context(self.broker)
        self.core = self._server("up", *self.core_args).start()
        self._stack.callback(lambda: self.core and self.core.__exit__(None, None, None))
        for _ in range(self._edges):
            self.edges.append(self._stack.enter_context(self._server("ingest")))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _server(self, command: str, *extra: str) -> MeterlineServer | ServedCore:
        if self.processes:
            return MeterlineServer(self.data_dir, *self.args(), *extra, command=command)
        return ServedCore(self.data_dir, *self.args(), *extra, command=command)

    def restart_core(self) -> None:
        """SIGKILL the core, then start a new process on the same data dir (`processes`)."""
        assert isinstance(self.core, MeterlineServer), "a core in a thread cannot be killed"
        self.core.kill()
        self.core = self._server("up", *self.core_args).start()

    def tenant(self, name: str) -> Self:
        """This pipeline as a new organization `name` sees it (a token of its own, which the
        edges take): tests that share a pipeline each work in their own organization."""
        view = copy.copy(self)
        view._token = new_org_token(self.data_dir, name)
        for edge in self.edges:
            edge_token(edge, view._token)
        return view

    def token(self) -> str:
        """The organization's token: the development token's, or the `tenant`'s."""
        assert self.core is not None and self.core.token is not None
        return self._token or self.core.token

    def organization_id(self) -> str:
        """The id of the token's organization (a new customer shows it)."""
        assert self.core is not None
        with self.core.client(self.token()) as client:
            response = client.post("/v1/customers/", json={"email": "probe@example.com"})
            assert response.status_code == 201, response.text
            return str(response.json()["organization_id"])

    def create_meter(self, definition: dict[str, Any] = TOKENS_METER) -> str:
        assert self.core is not None
        with self.core.client(self.token()) as client:
            response = client.post("/v1/meters/", json=definition)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

    def stored_events(self) -> int:
        assert self.core is not None
        with self.core.client(self.token()) as client:
            response = client.get("/v1/events/", params={"limit": 1})
            assert response.status_code == 200, response.text
            return int(response.json()["pagination"]["total_count"])

    def wait_for_events(self, count: int) -> None:
        wait_for(f"the core to store {count} events", lambda: self.stored_events() >= count)
        assert self.stored_events() == count

    def quantity(self, meter_id: str, **params: Any) -> float:
        assert self.core is not None
        with self.core.client(self.token()) as client:
            response = client.get(
                f"/v1/meters/{meter_id}/quantities",
                params={**_wide(), **params},
            )
            assert response.status_code == 200, response.text
            return float(response.json()["total"])


class Oracle:
    """The plain-Python model: the first event of each external_id counts, forever."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}

    def add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.events.setdefault(event["external_id"], event)

    def tokens_by_customer(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for event in self.events.values():
            totals[event["external_customer_id"]] += event["metadata"]["tokens"]
        return dict(totals)


def usage_batches(seed: int, batches: int, size: int, tag: str) -> Iterator[list[dict[str, Any]]]:
    """Batches of usage events over 5 customers; about 1 in 20 repeats an earlier external_id
    of the same customer with other values (a buggy retry), which must not count. (Records are
    keyed by customer, so one customer's events keep their order; "first write wins" across
    customers depends on which partition the core reads first.)"""
    rng = random.Random(seed)
    sent: list[tuple[str, str]] = []
    for b in range(batches):
        batch = []
        for i in range(size):
            if sent and rng.random() < 0.05:
                external_id, customer = rng.choice(sent)
            else:
                external_id, customer = f"{tag}-{b}-{i}", f"cust_{rng.randrange(5)}"
                sent.append((external_id, customer))
            batch.append(
                {
                    "name": "llm_call",
                    "external_customer_id": customer,
                    "external_id": external_id,
                    "metadata": {"tokens": rng.randrange(1, 5000)},
                }
            )
        yield batch


def send_until_accepted(client: httpx.Client, events: list[dict[str, Any]]) -> int:
    """POST until a 2xx, as a client with retries does (same body, same external_ids); returns
    how many attempts it took (on the test's deadline)."""
    attempts = 0

    def accepted() -> bool:
        nonlocal attempts
        attempts += 1
        try:
            response = client.post("/v1/events/ingest", json={"events": events})
        except httpx.TransportError:
            return False
        assert response.status_code in (200, 503), response.text
        return response.status_code == 200

    wait_for(f"a batch of {len(events)} events to be accepted", accepted)
    return attempts


Headers = list[tuple[str, bytes]]


async def produce_raw(bootstrap: str, records: list[tuple[Headers, bytes | None]]) -> list[int]:
    """Write records straight to partition 0 of the events topic, as any Kafka producer may;
    their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(
                "meterline.events", value, key=b"k", partition=0, headers=headers
            )
            for headers, value in records
        ]
        return [s.offset for s in sent]
    finally:
        await producer.stop()


async def topic_records(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic`, up to its end as of the call (on the test's deadline)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # the cluster's metadata, with the topic's partitions
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: list[ConsumerRecord[bytes, bytes]] = []
        while [p for p in partitions if await consumer.position(p) < ends[p]]:
            assert seconds_left() > 0, waited_too_long(f"the records of {topic}")
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                found += batch
        return found
    finally:
        await consumer.stop()


async def dead_letters(bootstrap: str, expected: int) -> list[tuple[dict[str, str], bytes]]:
    """The dead-letter topic's records (headers, value), once `expected` are there (or when
    the test's deadline is out: the caller's assertion then says what is missing)."""
    while True:
        records = await topic_records(bootstrap, "meterline.events.dead")
        found = [({k: v.decode() for k, v in r.headers}, r.value or b"") for r in records]
        if len(found) >= expected or seconds_left() <= 0:
            return found
        await asyncio.sleep(0.2)  # the core dead-letters as it reads
