"""The Kafka transport: edge ingest, the consumer core, and end-to-end freshness.

Three benchmarks, each runnable alone by name (`.venv/bin/python -m benchmarks.run NAME`, add
`--quick` for a smoke run). The broker is Tansu (`tests.processes.Broker`: Kafka protocol,
memory storage, one process) on the same 2-core machine as everything else; it has no
idempotent producer, so meterline runs with `--no-idempotence`. Topics have 6 partitions
(meterline's default) and acks=all.

kafka_ingest_http: HTTP → Kafka. One `meterline ingest` edge (token made with `meterline token
create` in its data dir) takes ingest_http's load (the same load-generator process and bodies:
batches of 1,000 realistic LLM events, 8 requests in flight; a warm-up sizes 10 s runs), and the
events in the topic afterwards (the edge writes columnar records, many events each) must equal
the events acknowledged. Then one run at half the median rate, open-loop (a request every
1,000 / rate s), for request latency below saturation. Reference, same broker: raw aiokafka
publishing the same events as one JSON record each (the previous edges' format and any
producer's), encoded before timing (`record_key`/`record_value` of validated loadgen events),
per request grouped by partition (`create_batch`/`send_batch`, acks=all, 8 requests in flight),
to a fresh topic. The ratio edge/raw is what HTTP, validation and the edge's process cost, less
what the columnar format saves; bytes per event in each topic are compared too.

kafka_consume: Kafka → DuckDB. A topic is preloaded (untimed, raw aiokafka) with N validated loadgen
events as edges write them (columnar records, one per partition per request); then, in this process,
a `Store` on a temp file with the 10 meters of `benchmarks.meters.METERS` and the `Consumer` (the
core's, same settings, decoding in a worker pool of one process per CPU as the core's) is timed from
its partition assignment (its clients' start before it is reported apart) until the offsets
stored with the events reach the topic's end; the rollups are then checked against the events
(`check_rollups`).
References, same records: DuckDB alone (the values as a JSON-lines file, one SQL computing the 10
meters per customer and 15-minute bucket, i.e. rollup grain, with `read_ndjson` and an explicit
schema), and Quix Streams (`benchmarks/peers/quixstreams_meters.py`, the same 10 meters in tumbling
15-minute windows per key, own consumer group, subprocess) on a topic of the same events as JSON
records, after our consumer; its per-meter totals must equal meterline's.

kafka_freshness: broker, `meterline up --kafka` (the core: consumer + API) and one `meterline
ingest` edge on a shared data dir. The load generator sends a steady background load through
the edge (open-loop at a fixed rate); meanwhile a probe posts one event for its own customer
to the edge every ~200 ms, and a poller asks the core's balance check
(`/v1/customer-meters/check`, a count meter, `external_customer_id=probe`) for that customer's
consumed units every 50 ms: a probe's freshness is the time from its 2xx to the first answer
that counts it. One run (fresh broker, core and edge) per offered rate: 10,000, 50,000 and
100,000 events/s, each reporting the rate achieved and the rate the core applied; then one at
0.8x the most the core applied in those (what it can apply here, sharing the machine with the
edge and the load), whose p99 is issue 61's bar (500 ms). Probes do not wait for
visibility, so a core falling behind shows as growing freshness, not as fewer probes. When the
load ends, the core's `/metrics` gives the consumer lag, and the time to drain it is measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from aggregator.auth import TokenRegistry
from aggregator.intake.consumer import Consumer
from aggregator.intake.journal import Journal
from aggregator.intake.leadership import Role
from aggregator.intake.splits import Splits
from aggregator.store import Store
from aggregator.store.apply.consumed import stored_offsets
from benchmarks import loadgen
from benchmarks.common import cpu_seconds, metric, percentile
from benchmarks.ingest_http import BATCH_SIZE, CONCURRENCY, RUN_SECONDS, LoadGenerator
from benchmarks.meters import METERS, check_rollups, create_meters
from benchmarks.server import Server
from ingest.kafka import KafkaSettings
from meters import columnar
from meters.columnar import partition_of
from meters.events import EventRules, parse_ingest_body, validate_body
from meters.records import record_key, record_value
from meters.times import now_us
from tests.inprocess import token_cli
from tests.processes import Broker, edge_token

ORG = "bench"
PARTITIONS = KafkaSettings("").partitions  # what `meterline ingest` creates: 6
EVENTS_TOPIC = KafkaSettings("").topic
# Quix Streams reads each input topic's retention.ms from the broker and fails without it
# (KeyError in TopicManager.derive_topic_config); Tansu reports only the configs a topic was
# created with, so the benchmark's topics are created with it explicitly.
TOPIC_CONFIGS = {"retention.ms": "-1"}
Requests = list[list[tuple[bytes, bytes]]]  # per request body: (key, value) of each record
# Per request body: (partition, value, headers) of each columnar record.
ColumnarRequests = list[list[columnar.Record]]


# ---- shared ---------------------------------------------------------------------------------


def encoded_records(organization_id: str, batches: int, seed: int, tag: str) -> Requests:
    """Loadgen's request bodies as an edge publishes them: validated by the ingest rules, then
    each event's record key and value (`meters.records`)."""
    now = now_us()
    rules = EventRules()
    requests = []
    for body in loadgen.make_bodies(tag, batches, BATCH_SIZE, seed):
        events = parse_ingest_body(orjson.loads(body), now=now, rules=rules)
        requests.append(
            [
                (record_key(organization_id, e), record_value(e, organization_id, now))
                for e in events
            ]
        )
    return requests


def columnar_requests(organization_id: str, batches: int, seed: int, tag: str) -> ColumnarRequests:
    """Loadgen's request bodies as an edge publishes them: validated, then one columnar record
    per partition (`meters.columnar`, the edge's default compression)."""
    now = now_us()
    rules = EventRules()
    requests = []
    for body in loadgen.make_bodies(tag, batches, BATCH_SIZE, seed):
        table = validate_body(body, now=now, rules=rules)
        encoded = columnar.encode(table, organization_id, now, partitions=PARTITIONS)
        requests.append(encoded.records)
    return requests


async def publish_columnar(bootstrap: str, topic: str, requests: ColumnarRequests) -> None:
    """`produce_columnar` with a producer of its own."""
    producer = raw_producer(bootstrap)
    await producer.start()
    try:
        await produce_columnar(producer, topic, requests)
    finally:
        await producer.stop()


async def produce_columnar(
    producer: AIOKafkaProducer, topic: str, requests: ColumnarRequests
) -> None:
    """Publish each request's records as `KafkaPublisher.publish` does, CONCURRENCY requests
    in flight."""
    pending = iter(requests)

    async def worker() -> None:
        for records in pending:
            timestamp_ms = time.time_ns() // 1_000_000
            acks = [
                await producer.send(
                    topic,
                    r.value,
                    partition=r.partition,
                    timestamp_ms=timestamp_ms,
                    headers=r.headers,
                )
                for r in records
            ]
            await asyncio.gather(*acks)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def topic_events(bootstrap: str, topic: str) -> dict[str, int]:
    """Events in `topic` (a columnar record holds many, a JSON record one), its records, and
    the bytes of their values, read from the start."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    found = {"events": 0, "records": 0, "value_bytes": 0}
    try:
        while fetched := await consumer.getmany(timeout_ms=2000, max_records=10_000):
            for records in fetched.values():
                for record in records:
                    read = columnar.read(record.value, list(record.headers))
                    found["events"] += 1 if isinstance(read, str) else read.events.num_rows
                    found["records"] += 1
                    found["value_bytes"] += len(record.value or b"")
        return found
    finally:
        await consumer.stop()


async def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, PARTITIONS, 1, topic_configs=TOPIC_CONFIGS) for name in names]
        )
    finally:
        await admin.close()


async def produce(producer: AIOKafkaProducer, topic: str, requests: Requests) -> None:
    """Publish each request's records as `KafkaPublisher.publish` does (per partition batches,
    all acknowledged before the request is done), CONCURRENCY requests in flight.

    One lock per partition around `send_batch`, which the publisher does not have: aiokafka
    queues one batch per partition, and its `add_batch` deducts the time elapsed since it was
    called from its remaining timeout on *every* wait for that slot (message_accumulator.py), so
    when several requests contend for a partition, one that keeps losing the race runs out of
    time quadratically: this producer, faster than the edge, got KafkaTimeoutError after
    about 10 s of the 40 s request timeout. A FIFO lock makes each call wait at most once.
    """
    pending = iter(requests)  # shared by the workers: each request is sent once
    locks = {p: asyncio.Lock() for p in range(PARTITIONS)}

    async def worker() -> None:
        for records in pending:
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for key, value in records:
                by_partition.setdefault(partition_of(key, PARTITIONS), []).append((key, value))
            timestamp_ms = time.time_ns() // 1_000_000
            acks = []
            for partition, rows in by_partition.items():
                batch = producer.create_batch()
                for key, value in rows:
                    if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
                        async with locks[partition]:
                            acks.append(await _send(producer, batch, topic, partition))
                        batch = producer.create_batch()
                        batch.append(key=key, value=value, timestamp=timestamp_ms)
                async with locks[partition]:
                    acks.append(await _send(producer, batch, topic, partition))
            await asyncio.gather(*acks)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _send(producer: AIOKafkaProducer, batch: Any, topic: str, partition: int) -> Any:
    batch.close()
    return await producer.send_batch(batch, topic, partition=partition)


def raw_producer(bootstrap: str) -> AIOKafkaProducer:
    """The edge's producer settings (acks=all, linger 5 ms, 1 MiB batches), without idempotence
    (Tansu lacks it)."""
    return KafkaSettings(bootstrap, idempotence=False).producer()


def broker_cpu(broker: Broker) -> float:
    # The broker's pid is not public in tests.processes; its CPU share matters here because
    # it runs on the same two cores as everything it is compared with.
    assert broker._proc is not None
    return cpu_seconds(broker._proc.pid)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kafka_args(broker: Broker) -> tuple[str, ...]:
    return ("--kafka", broker.bootstrap, "--no-idempotence")  # Tansu: no idempotent producer


def _published(broker: Broker, data_dir: Path, edge: Server, token: str) -> str:
    """`token`, once the edge accepts it: a core publishes its data dir's tokens on the control
    topic, which edges follow. The core is stopped before anything is timed (the edge keeps
    what it read), so that it takes no CPU from the edge."""
    with Server(*kafka_args(broker), command="core", data_dir=data_dir):
        return edge_token(edge, token)


def create_token(data_dir: Path) -> tuple[str, str]:
    """A token for organization ORG in the data dir's registry, and the organization's id."""
    done = token_cli(data_dir, "create", "--org", ORG, "--label", "benchmark", "--init")
    if done.returncode != 0:
        raise RuntimeError(f"meterline token create failed: {done.stderr}")
    registry = TokenRegistry(data_dir)
    try:
        return done.stdout.strip(), registry.organization(ORG).id
    finally:
        registry.close()


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 2)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


# ---- kafka_ingest_http ----------------------------------------------------------------------

TARGET_EDGE_EVENTS_PER_S = 150_000
EDGE_FULL = {"warmup_batches": 30, "runs": 5, "min_batches": 50, "max_batches": 2_000}
EDGE_QUICK = {"warmup_batches": 5, "runs": 2, "min_batches": 20, "max_batches": 20}
RAW_TOPIC = "bench.raw"


def kafka_ingest_http(quick: bool = False) -> dict[str, Any]:
    """One `meterline ingest` edge publishes ≥ 150,000 events/s from HTTP to Kafka.

    Hypothesis: a single ingest edge, validating each request and publishing it to a local Kafka
    broker with acks=all before answering, accepts at least 150,000 realistic LLM events/s in
    batches of 1,000 with 8 requests in flight, with zero errors and every acknowledged event in
    the topic; at half that load its requests answer well inside the ingest deadline. Raw
    aiokafka publishing the same records to the same broker bounds what the edge could reach.
    """
    plan = EDGE_QUICK if quick else EDGE_FULL
    data_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-edge-"))
    try:
        token, organization_id = create_token(data_dir)
        with (
            Broker() as broker,
            Server(*kafka_args(broker), command="ingest", data_dir=data_dir) as edge,
        ):
            edge.token = _published(broker, data_dir, edge, token)
            load = LoadGenerator(edge)
            try:
                warmup = _edge_run(load, broker, "warmup", plan["warmup_batches"], 0)
                # Size runs from the warm-up so each lasts about RUN_SECONDS on this machine.
                wanted = round(warmup["events_per_s"] * RUN_SECONDS / BATCH_SIZE)
                batches = max(plan["min_batches"], min(plan["max_batches"], wanted))
                runs = [
                    _edge_run(load, broker, f"run{i}", batches, i)
                    for i in range(1, plan["runs"] + 1)
                ]
                half_rate = _median(runs, "events_per_s") / 2
                half_batches = max(
                    plan["min_batches"],
                    min(plan["max_batches"], round(half_rate * RUN_SECONDS / BATCH_SIZE)),
                )
                half = _edge_run(load, broker, "half", half_batches, 100, rate=half_rate)
            finally:
                load.close()
            memory = edge.memory_kib()
            in_topic = asyncio.run(topic_events(broker.bootstrap, EVENTS_TOPIC))
            exit_code = edge.stop()
            output = [line.replace(token, "<token>") for line in edge.output[-20:]]
            print(f"   raw aiokafka: {batches} batches per run", flush=True)
            raw = asyncio.run(_raw_runs(broker, organization_id, batches, plan["runs"]))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    everything = [warmup, *runs, half]
    acknowledged = sum(r["events"] for r in everything)
    errors = sum(r["errors"] for r in everything)
    latencies = [x for r in runs for x in r.pop("latencies")]
    half.pop("latencies")  # its p50 and p99 are kept
    warmup.pop("latencies")
    edge_rate = _median(runs, "events_per_s")
    raw_rate = _median(raw["runs"], "events_per_s")
    metrics = [
        metric("events/s (median of runs)", edge_rate, "events/s", ">=", TARGET_EDGE_EVENTS_PER_S),
        metric("events/s (slowest run)", min(r["events_per_s"] for r in runs), "events/s"),
        metric("request latency p50 (full load)", _ms(latencies, 50), "ms"),
        metric("request latency p99 (full load)", _ms(latencies, 99), "ms"),
        metric(f"request latency p50 at half load ({half_rate:,.0f}/s)", half["p50_ms"], "ms"),
        metric(f"request latency p99 at half load ({half_rate:,.0f}/s)", half["p99_ms"], "ms"),
        metric("raw aiokafka events/s (median of runs)", raw_rate, "events/s"),
        metric("edge / raw aiokafka", edge_rate / raw_rate, "x"),
        metric("edge CPU (median of runs)", _median(runs, "server_cpu_cores"), "cores"),
        metric(
            "edge validation workers CPU (median)",
            _median(runs, "validation_workers_cores"),
            "cores",
        ),
        metric("broker CPU, edge runs (median)", _median(runs, "broker_cpu_cores"), "cores"),
        metric("broker CPU, raw runs (median)", _median(raw["runs"], "broker_cpu_cores"), "cores"),
        metric("load generator CPU (median)", _median(runs, "client_cpu_cores"), "cores"),
        metric("edge peak RSS (VmHWM)", memory["VmHWM"] / 1024, "MiB"),
        metric("errors", errors, "requests", "==", 0),
        metric(
            "acknowledged but not in the topic",
            acknowledged - in_topic["events"],
            "events",
            "==",
            0,
        ),
        metric("edge: bytes per event in the topic", in_topic["value_bytes"] / acknowledged, "B"),
        metric("raw JSON records: bytes per event", raw["record_value_bytes_avg"], "B"),
        metric(
            "edge / raw JSON bytes per event",
            in_topic["value_bytes"] / acknowledged / raw["record_value_bytes_avg"],
            "x",
            "<=",
            0.5,
        ),
    ]
    return {
        "metrics": metrics,
        "details": {
            "mode": "quick" if quick else "full",
            "batch_size": BATCH_SIZE,
            "concurrency": CONCURRENCY,
            "partitions": PARTITIONS,
            "edge_validation_workers": "default (CPU count)",
            "runs": runs,
            "warmup": warmup,
            "half_load_run": half,
            "acknowledged_events": acknowledged,
            "topic": in_topic,
            "raw_aiokafka": raw,
            "edge_exit_code": exit_code,
            "edge_stop_seconds": round(edge.stop_seconds or 0.0, 2),
            "edge_memory_kib": memory,
            "edge_output_tail": output,
        },
    }


def _edge_run(
    load: LoadGenerator,
    broker: Broker,
    tag: str,
    batches: int,
    seed: int,
    rate: float | None = None,
) -> dict[str, Any]:
    prepared = load.prepare(tag, batches, seed)
    cpu = broker_cpu(broker)
    run = load.go(prepared, rate)
    run["broker_cpu_cores"] = round((broker_cpu(broker) - cpu) / run["seconds"], 2)
    run["load_average_1m_after"] = round(os.getloadavg()[0], 2)  # others on the machine?
    label = tag if rate is None else f"{tag} (at {rate:,.0f} events/s)"
    print(
        f"   {label}: {run['events']:,} events in {run['seconds']:.2f} s ="
        f" {run['events_per_s']:,.0f} events/s, p50 {run['p50_ms']:.0f} ms,"
        f" p99 {run['p99_ms']:.0f} ms, errors {run['errors']}, edge"
        f" {run['server_cpu_cores']:.2f} + workers {run['validation_workers_cores']:.2f} cores,"
        f" broker {run['broker_cpu_cores']:.2f} cores",
        flush=True,
    )
    return run


async def _raw_runs(
    broker: Broker, organization_id: str, batches: int, runs: int
) -> dict[str, Any]:
    started = time.perf_counter()
    requests = encoded_records(organization_id, batches, seed=1000, tag="raw")
    encode_seconds = time.perf_counter() - started
    events = sum(len(r) for r in requests)
    await create_topics(broker.bootstrap, [RAW_TOPIC])
    producer = raw_producer(broker.bootstrap)
    await producer.start()
    results = []
    try:
        await produce(producer, RAW_TOPIC, requests[: max(5, len(requests) // 10)])  # warm-up
        for i in range(1, runs + 1):
            cpu, brokers = own_cpu(), broker_cpu(broker)
            started = time.perf_counter()
            await produce(producer, RAW_TOPIC, requests)
            seconds = time.perf_counter() - started
            results.append(
                {
                    "events": events,
                    "seconds": round(seconds, 3),
                    "events_per_s": round(events / seconds, 1),
                    "producer_cpu_cores": round((own_cpu() - cpu) / seconds, 2),
                    "broker_cpu_cores": round((broker_cpu(broker) - brokers) / seconds, 2),
                    "load_average_1m_after": round(os.getloadavg()[0], 2),
                }
            )
            r = results[-1]
            print(
                f"   raw run {i}/{runs}: {events:,} events in {r['seconds']:.2f} s ="
                f" {r['events_per_s']:,.0f} events/s, producer {r['producer_cpu_cores']:.2f},"
                f" broker {r['broker_cpu_cores']:.2f} cores",
                flush=True,
            )
    finally:
        await producer.stop()
    return {
        "topic": RAW_TOPIC,
        "events_per_run": events,
        "record_value_bytes_avg": round(
            sum(len(v) for r in requests for _, v in r) / max(1, events), 1
        ),
        "encode_seconds_untimed": round(encode_seconds, 2),
        "runs": results,
    }


# ---- kafka_consume --------------------------------------------------------------------------

TARGET_CONSUME_EVENTS_PER_S = 300_000
# Issue 61's bar, in an --against run of the engine before it (5dc57ca).
AGAINST_CONSUME = 3.0
CONSUME_FULL = {"events": 1_000_000, "duckdb_runs": 3, "timeout": 900.0}
CONSUME_QUICK = {"events": 50_000, "duckdb_runs": 3, "timeout": 180.0}
CONSUME_TOPIC = "bench.consume"
PEER_TOPIC = "bench.consume.json"
PEER = "benchmarks.peers.quixstreams_meters"

# The 10 METERS per customer and 15-minute bucket (the rollups' grain), from the raw values.
# The explicit schema is what a DuckDB user with a known record format would write: only these
# fields are parsed.
REFERENCE_SQL = """
SELECT external_customer_id, time_bucket(INTERVAL 15 MINUTE, "timestamp") AS bucket,
    count(*) AS requests,
    sum(metadata._llm.total_tokens) AS total_tokens,
    sum(metadata._llm.input_tokens) AS input_tokens,
    avg(metadata._llm.total_tokens) AS avg_tokens,
    min(metadata._llm.input_tokens) AS smallest_prompt,
    max(metadata._llm.total_tokens) AS largest_request,
    count(DISTINCT metadata._llm.model) AS models,
    sum(metadata._cost.amount::DOUBLE) AS cost,
    sum(metadata._llm.total_tokens) FILTER (WHERE contains(metadata._llm.model, 'gpt'))
        AS gpt_tokens,
    count(*) FILTER (WHERE name = 'llm_completion' AND metadata.streamed) AS streamed
FROM read_ndjson('{path}', columns = {{
    'name': 'VARCHAR',
    'timestamp': 'TIMESTAMPTZ',
    'external_customer_id': 'VARCHAR',
    'metadata': 'STRUCT(_llm STRUCT(model VARCHAR, input_tokens BIGINT, total_tokens BIGINT),
        _cost STRUCT(amount VARCHAR), streamed BOOLEAN)'
}})
GROUP BY ALL
"""
# Per meter (by name), its total over all buckets from the reference's table; `unique` cannot be
# merged from per-bucket counts, so it is not compared.
REFERENCE_TOTALS = {
    "LLM requests": "sum(requests)",
    "Total tokens": "sum(total_tokens)",
    "Input tokens": "sum(input_tokens)",
    "Average tokens per request": "sum(total_tokens) / sum(requests)",
    "Smallest prompt": "min(smallest_prompt)",
    "Largest request": "max(largest_request)",
    "LLM cost": "sum(cost)",
    "GPT tokens": "sum(gpt_tokens)",
    "Streamed chat completions": "sum(streamed)",
}


def kafka_consume(quick: bool = False) -> dict[str, Any]:
    """The consumer core applies ≥ 300,000 events/s from Kafka to DuckDB with 10 meters.

    Hypothesis: meterline's Kafka consumer (decode and validate each record, insert the events
    with their rollups for 10 meters and the offsets in one DuckDB transaction per poll) applies
    at least 300,000 realistic events/s from a preloaded topic, and the rollups equal the events.
    DuckDB alone aggregating the same JSON, and Quix Streams computing the same 10 meters from
    the same topic, are measured beside it.
    """
    plan = CONSUME_QUICK if quick else CONSUME_FULL
    n = plan["events"]
    work = Path(tempfile.mkdtemp(prefix="meterline-bench-consume-"))
    registry = TokenRegistry(work)
    try:
        organization_id = registry.organization(ORG).id
        started = time.perf_counter()
        # The same events twice: as an edge writes them (what the core is timed on) and as
        # JSON records (the DuckDB reference's lines, and the topic Quix Streams reads).
        requests = encoded_records(organization_id, n // BATCH_SIZE, seed=7, tag="consume")
        edge_requests = columnar_requests(organization_id, n // BATCH_SIZE, seed=7, tag="consume")
        encode_seconds = time.perf_counter() - started
        with Broker() as broker:
            settings = KafkaSettings(
                broker.bootstrap,
                topic=CONSUME_TOPIC,
                dead_letter_topic=CONSUME_TOPIC + ".dead",
                idempotence=False,
                consumer_group="meterline-bench",
            )
            started = time.perf_counter()
            in_topic = asyncio.run(_preload(settings, requests, edge_requests))
            preload_seconds = time.perf_counter() - started
            print(
                f"   preloaded {n:,} events in {in_topic:,} columnar records, and as JSON records"
                f" for the peer, in {preload_seconds:.1f} s (untimed)",
                flush=True,
            )
            del edge_requests
            # The DuckDB reference's input, written now so that the records need not stay in
            # memory while the consumer runs (a million tuples would lengthen its GC passes).
            ndjson = work / "records.ndjson"
            with ndjson.open("wb") as handle:
                for records in requests:
                    handle.writelines(value + b"\n" for _, value in records)
            del requests
            database = work / "meterline.duckdb"
            ours = asyncio.run(
                _consume(
                    settings,
                    database,
                    registry,
                    organization_id,
                    (n, in_topic),
                    broker,
                    plan["timeout"],
                )
            )
            checked = _check(database, organization_id)
            print("   -- Quix Streams peer", flush=True)
            peer = run_peer(broker.bootstrap, PEER_TOPIC, n, work, plan["timeout"])
        print("   -- DuckDB alone", flush=True)
        reference = duckdb_reference(ndjson, n, plan["duckdb_runs"])
    finally:
        registry.close()
        shutil.rmtree(work, ignore_errors=True)

    ours_rate = ours["events_per_s"]
    from_rollups = {m["name"]: m["from_rollups"] for m in checked["meters"]}
    from_events = {m["name"]: m["from_events"] for m in checked["meters"]}
    reference["agreement"] = _agreement(reference.pop("totals"), from_events)
    peer_rate = peer.get("events_per_s")
    if "totals" in peer:
        peer["agreement"] = _agreement(peer.pop("totals"), from_rollups)
    commit = ours.pop("commit_seconds")
    metrics = [
        metric(
            "consumer events/s (10 meters, assignment to last applied)",
            ours_rate,
            "events/s",
            ">=",
            TARGET_CONSUME_EVENTS_PER_S,
            against=(">=", AGAINST_CONSUME),
        ),
        metric(
            "consumer events/s including its start",
            ours["events_per_s_with_start"],
            "events/s",
        ),
        metric("events applied more than once", ours["applied_twice"], "events"),
        metric("batch commit p50", _ms(commit, 50), "ms"),
        metric("batch commit p99", _ms(commit, 99), "ms"),
        metric("events per batch (mean)", ours["events_per_batch"], "events"),
        metric("consumer CPU (process and decoding workers)", ours["cpu_cores"], "cores"),
        metric("broker CPU while consuming", ours["broker_cpu_cores"], "cores"),
        metric("meters disagreeing with events", checked["disagreeing"], "meters", "==", 0),
        metric("events not stored", n - checked["stored_events"], "events", "==", 0),
        metric(
            "records not applied",
            in_topic - sum(ours["stored_offsets"].values()),
            "records",
            "==",
            0,
        ),
        metric("dead-lettered", ours["dead_lettered"], "records", "==", 0),
        metric("DuckDB alone, same JSON: events/s (median)", reference["events_per_s"], "events/s"),
        metric("consumer / DuckDB alone", ours_rate / reference["events_per_s"], "x"),
    ]
    if peer_rate:
        metrics += [
            metric("Quix Streams events/s (after its first record)", peer_rate, "events/s"),
            metric("consumer / Quix Streams", ours_rate / peer_rate, "x"),
            metric(
                "Quix Streams meters disagreeing with meterline",
                peer["agreement"]["disagreeing"],
                "meters",
                "==",
                0,
            ),
        ]
    return {
        "metrics": metrics,
        "details": {
            "mode": "quick" if quick else "full",
            "events": n,
            "partitions": PARTITIONS,
            "encode_seconds_untimed": round(encode_seconds, 2),
            "preload_seconds_untimed": round(preload_seconds, 2),
            "consumer": ours,
            "rollups_check": checked,
            "duckdb_reference": reference,
            "quixstreams_peer": peer,
        },
    }


async def _preload(
    settings: KafkaSettings, requests: Requests, edge_requests: ColumnarRequests
) -> int:
    """The edge's records to the consumer's topic, the JSON records to the peer's; the number
    of records in the consumer's."""
    # Every topic up front, with retention.ms (see TOPIC_CONFIGS); the consumer's own
    # ensure_topics then finds them.
    await create_topics(
        settings.bootstrap, [settings.topic, settings.dead_letter_topic, PEER_TOPIC]
    )
    producer = raw_producer(settings.bootstrap)
    await producer.start()
    try:
        await produce_columnar(producer, settings.topic, edge_requests)
        await produce(producer, PEER_TOPIC, requests)
    finally:
        await producer.stop()
    return sum(len(records) for records in edge_requests)


async def _consume(
    settings: KafkaSettings,
    database: Path,
    registry: TokenRegistry,
    organization_id: str,
    sizes: tuple[int, int],
    broker: Broker,
    give_up_after: float,
) -> dict[str, Any]:
    """Run the core's consumer over the preloaded topic until every record is applied
    (`sizes`: the events and the records in the topic).

    "Every record applied" is the stored offsets (committed with the events) reaching the
    topic's end, not `consumer.applied == n`: `applied` would also count records applied more
    than once (see `applied_twice`).
    """
    n, records = sizes
    async with Store(database) as store:
        await create_meters(store, organization_id)
        started = time.perf_counter()
        assigned: float | None = None
        cpu = brokers = 0.0
        role = Role(leading=True)  # the one core: it leads without a lease
        journal = Journal(store, settings, role)
        splits = Splits(settings.shard)
        consumer = Consumer(
            store, settings, EventRules(), registry.organization_exists, journal, role, splits
        )
        async with journal, consumer:
            await journal.start()
            while time.perf_counter() - started < give_up_after:
                await asyncio.sleep(0.005)
                # Partitions are assigned and fetched from once lag() knows a high watermark:
                # the time before is the clients' start (no group to join: it leads).
                if assigned is None and await consumer.lag():
                    assigned = time.perf_counter()
                    cpu, brokers = _consumer_cpu(broker), broker_cpu(broker)
                if consumer.applied + consumer.dead_lettered >= n:
                    stored = await store.read(stored_offsets, settings.topic)
                    if sum(stored.values()) >= records:
                        break
            done = time.perf_counter()
            cpu, brokers = _consumer_cpu(broker) - cpu, broker_cpu(broker) - brokers
            applied, dead = consumer.applied, consumer.dead_lettered
            commit_seconds = list(consumer.commit_seconds)
            stored = await store.read(stored_offsets, settings.topic)
    complete = sum(stored.values()) >= records
    seconds = done - started
    assigned = assigned or started
    busy = done - assigned  # CPU shares are over this part, the clients' start left out
    rate = n / busy if complete else 0.0
    print(
        f"   consumer: {n:,} events ({records:,} records) in {seconds:.2f} s, {busy:.2f} s after"
        f" the assignment at {assigned - started:.2f} s = {rate:,.0f} events/s; applied"
        f" {applied:,} in {len(commit_seconds)} batches, CPU {cpu / busy:.2f} cores, broker"
        f" {brokers / busy:.2f} cores",
        flush=True,
    )
    return {
        "events": n,
        "records": records,
        "complete": complete,
        "seconds": round(seconds, 3),
        "assigned_at_seconds": round(assigned - started, 3),
        "events_per_s": round(rate, 1),
        "events_per_s_with_start": round(n / seconds if complete else 0.0, 1),
        "applied": applied,
        # Records in more than one committed batch (`applied` counts each batch's records).
        # Before commit a73aad8 the rebalance listener's seek_to_beginning could run while
        # getmany already returned records from offset 0, and partitions were read again.
        "applied_twice": applied - n,  # events
        "dead_lettered": dead,
        "batches": len(commit_seconds),
        "events_per_batch": round(applied / max(1, len(commit_seconds)), 1),
        "cpu_cores": round(cpu / busy, 2),
        "broker_cpu_cores": round(brokers / busy, 2),
        "stored_offsets": stored,
        "commit_seconds": commit_seconds,
    }


def _consumer_cpu(broker: Broker) -> float:
    """CPU seconds of this process and its live children but the broker: the consumer, the
    store's threads and the decoding workers (which RUSAGE_CHILDREN would miss: not exited)."""
    me = os.getpid()
    assert broker._proc is not None
    children = [
        int(pid)
        for task in Path(f"/proc/{me}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    return own_cpu() + sum(cpu_seconds(c) for c in children if c != broker._proc.pid)


def _check(database: Path, organization_id: str) -> dict[str, Any]:
    """The rollups against the events, on the file reopened after the store closed."""
    with duckdb.connect(str(database), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        checked = check_rollups(con, organization_id)
        row = con.execute("SELECT count(*) FROM events").fetchone()
    checked["stored_events"] = int(row[0]) if row else 0
    return checked


def duckdb_reference(path: Path, n: int, runs: int) -> dict[str, Any]:
    """DuckDB alone computing the 10 meters from the same record values, one JSON object per
    line in `path` (see REFERENCE_SQL)."""
    sql = REFERENCE_SQL.format(path=str(path).replace("'", "''"))
    times = []
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        for _ in range(runs):
            started = time.perf_counter()
            con.execute(f"CREATE OR REPLACE TABLE buckets AS {sql}")
            times.append(time.perf_counter() - started)
        columns = ", ".join(REFERENCE_TOTALS.values())
        row = con.execute(f"SELECT {columns}, count(*) FROM buckets").fetchone()
    assert row is not None
    seconds = statistics.median(times)
    totals = {name: float(v) for name, v in zip(REFERENCE_TOTALS, row, strict=False)}
    print(
        f"   DuckDB alone: {n:,} values in {seconds:.2f} s (median of {runs}) ="
        f" {n / seconds:,.0f} events/s, {row[-1]:,} customer buckets",
        flush=True,
    )
    return {
        "events": n,
        "seconds": [round(t, 3) for t in times],
        "events_per_s": round(n / seconds, 1),
        "buckets": int(row[-1]),
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "threads": "DuckDB default (all CPUs)",
        "totals": totals,
    }


def _agreement(totals: dict[str, float], meterline: dict[str, float]) -> dict[str, Any]:
    meters = [
        {
            "name": name,
            "value": value,
            "meterline": meterline[name],
            "agree": abs(value - meterline[name]) <= 1e-9 * max(1.0, abs(meterline[name])),
        }
        for name, value in totals.items()
    ]
    return {"meters": meters, "disagreeing": sum(not m["agree"] for m in meters)}


def run_peer(bootstrap: str, topic: str, n: int, work: Path, timeout: float) -> dict[str, Any]:
    """Quix Streams over the same topic, in its own process; what failed if it did not run."""
    out = work / "quixstreams.json"
    command = [sys.executable, "-m", PEER, "--bootstrap", bootstrap, "--topic", topic]
    command += ["--count", str(n), "--timeout", "60", "--out", str(out)]
    try:
        done = subprocess.run(
            command,
            cwd=Path(__file__).parents[1],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"Quix Streams did not finish in {timeout:.0f} s"}
    tail = (done.stdout + done.stderr).splitlines()[-30:]
    if not out.exists():
        return {"error": f"Quix Streams exited with {done.returncode}", "output_tail": tail}
    result: dict[str, Any] = json.loads(out.read_text())
    result["exit_code"] = done.returncode
    if done.returncode != 0:
        result["error"] = f"processed {result['outputs']:,} of {n:,} records"
        result["output_tail"] = tail
        result.pop("events_per_s", None)
    else:
        print(
            f"   Quix Streams: {result['outputs']:,} records in {result['processing_seconds']} s"
            f" after a {result['startup_seconds']} s start = {result['events_per_s']:,.0f}"
            f" events/s, CPU {result['cpu_cores']} cores",
            flush=True,
        )
    return result


# ---- kafka_freshness ------------------------------------------------------------------------

# Issue 61's bar: p99 at 0.8x what the core applies when offered more than it takes (the
# fixed rates' highest applied rate, in this set-up: core, edge and load on one machine).
TARGET_FRESHNESS_P99_MS = 500
TARGET_FRESHNESS_SHARE = 0.8
FRESH_FULL = {"rates": (10_000, 50_000, 100_000), "seconds": 30, "give_up_after": 120.0}
FRESH_QUICK = {"rates": (10_000,), "seconds": 8, "give_up_after": 30.0}
PROBE_INTERVAL = 0.2
# Between the end of one check and the next. Each costs the core a few ms of CPU; at 10 ms the
# polling alone took ~0.2 cores from it at 10,000 events/s (quick mode).
POLL_INTERVAL = 0.05
PROBE_CUSTOMER = "probe"


def kafka_freshness(quick: bool = False) -> dict[str, Any]:
    """An event accepted by an edge is in its customer's balance on the core within 500 ms
    (p99) at 0.8x what the core applies; measured at 10,000, 50,000 and 100,000 events/s
    offered first, the highest rate the core applied in those the 1x.

    Hypothesis: with a background load through one ingest edge, a probe event that got its 2xx
    from the edge is counted in the consumed units of `GET /v1/customer-meters/check` on the
    core within 500 ms at the 99th percentile: the consumer keeps up and applies each poll
    promptly.
    """
    plan: dict[str, Any] = FRESH_QUICK if quick else FRESH_FULL
    metrics: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    rates: list[int] = list(plan["rates"])
    for i, rate in enumerate(rates):
        run = _freshness_run(rate, plan["seconds"], plan["give_up_after"])
        fresh = run["probes"]["freshness"]
        last = i == len(plan["rates"])  # the run at a share of what the core applied
        target: tuple[str, float] | tuple[()] = ("<=", TARGET_FRESHNESS_P99_MS) if last else ()
        at = f"at {rate:,} offered" + (f" ({TARGET_FRESHNESS_SHARE}x applied)" if last else "")
        seconds = run["background"]["seconds"]
        metrics += [
            metric(f"freshness p50 {at}", _ms(fresh, 50), "ms"),
            metric(f"freshness p99 {at}", _ms(fresh, 99), "ms", *target),
            metric(
                f"background events/s achieved {at}", run["background"]["events_per_s"], "events/s"
            ),
            metric(f"core applied events/s {at}", run["applied_rate"], "events/s"),
            metric(f"consumer lag at the end of the load {at}", run["lag"], "records"),
            metric(f"probes never visible {at}", run["probes"]["never_visible"], "probes", "==", 0),
            metric(f"background errors {at}", run["background"]["errors"], "requests", "==", 0),
            metric(f"core CPU {at}", run["cpu"]["core"] / seconds, "cores"),
            metric(f"edge CPU (with workers) {at}", run["cpu"]["edge"] / seconds, "cores"),
        ]
        runs[at] = run
        if i == len(plan["rates"]) - 1:
            applied = max(r["applied_rate"] for r in runs.values())
            metrics.append(metric("core applied events/s, most of the runs", applied, "events/s"))
            rates.append(int(round(TARGET_FRESHNESS_SHARE * applied, -3)))
    return {
        "metrics": metrics,
        "details": {
            "mode": "quick" if quick else "full",
            "meter": METERS[0]["name"],
            "probe_interval_s": PROBE_INTERVAL,
            "poll_interval_s": POLL_INTERVAL,
            "runs": runs,
        },
    }


def _freshness_run(rate: int, seconds: float, give_up_after: float) -> dict[str, Any]:
    """One load at `rate` offered, with its probes; fresh broker, core and edge."""
    batches = round(rate * seconds / BATCH_SIZE)
    data_dir = Path(tempfile.mkdtemp(prefix="meterline-bench-fresh-"))
    try:
        with (
            Broker() as broker,
            Server(*kafka_args(broker), command="up", data_dir=data_dir) as core,
        ):
            meter_id = _create_meter(core, METERS[0])  # count of all events
            with core.client() as client:
                created = client.post(
                    "/v1/customers/",
                    json={"email": "probe@example.com", "external_id": PROBE_CUSTOMER},
                )
            if created.status_code != 201:
                raise RuntimeError(f"probe customer: {created.status_code} {created.text}")
            with Server(*kafka_args(broker), command="ingest", data_dir=data_dir) as edge:
                edge.token = core.token
                load = LoadGenerator(edge)
                try:
                    prepared = load.prepare("background", batches, 1)
                    print(f"   background: {batches} batches at {rate:,}/s", flush=True)
                    cpu = _cpus(core, edge, broker)
                    background: dict[str, Any] = {}
                    sender = threading.Thread(
                        target=lambda: background.update(load.go(prepared, rate)), daemon=True
                    )
                    sender.start()
                    probe = Probe(edge, core, meter_id)
                    probe.send_while(sender)
                    load_ended = time.perf_counter()
                    at_end = core_metrics(core)  # first: the lag as the load stops
                    cpu = {k: v - cpu[k] for k, v in _cpus(core, edge, broker).items()}
                    sender.join()
                finally:
                    load.close()
                published = background["events"] + probe.acknowledged
                drain = _drain(core, published, load_ended, give_up_after)
                probes = probe.finish(give_up_after)
                edge_exit = edge.stop()
            core_exit = core.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    fresh = probes["freshness"]
    background.pop("latencies")
    lag = sum(at_end["lag"].values())
    applied_rate = (
        at_end.get("meterline_consumer_applied_events_total", 0.0) / background["seconds"]
    )
    print(
        f"   {len(fresh)} probes: freshness p50 {_ms(fresh, 50):.0f} ms, p99 {_ms(fresh, 99):.0f}"
        f" ms, max {max(fresh, default=0) * 1000:.0f} ms; background"
        f" {background['events_per_s']:,.0f} events/s, core applied {applied_rate:,.0f}/s;"
        f" lag at the end {lag:,}; drained in {drain['seconds']:.2f} s",
        flush=True,
    )
    probes["ingest_latency_p50_ms"] = _ms(probes["ingest_latency"], 50)
    probes["ingest_latency_p99_ms"] = _ms(probes.pop("ingest_latency"), 99)
    # Per probe, in sending order: seconds since the first probe, freshness in ms.
    probes["series"] = [
        [round(t, 2), round(f * 1000, 1)]
        for t, f in zip(probes.pop("sent_at"), fresh, strict=False)
    ]
    return {
        "offered_rate": rate,
        "batches": batches,
        "probes": probes,
        "background": background,
        "applied_rate": applied_rate,
        "lag": lag,
        "core_metrics_at_end_of_load": at_end,
        "drain": drain,
        "cpu": {k: round(v, 2) for k, v in cpu.items()},
        "exit_codes": {"edge": edge_exit, "core": core_exit},
    }


def _create_meter(core: Server, definition: dict[str, Any]) -> str:
    with core.client() as client:
        response = client.post("/v1/meters/", json=definition)
    if response.status_code != 201:
        raise RuntimeError(f"meter not created: {response.status_code} {response.text}")
    return str(response.json()["id"])


def _cpus(core: Server, edge: Server, broker: Broker) -> dict[str, float]:
    """CPU seconds so far: each meterline process with its validation workers, the broker."""
    core_total, _, core_workers = core.cpu_seconds()
    edge_total, _, edge_workers = edge.cpu_seconds()
    return {
        "core": core_total + core_workers,
        "edge": edge_total + edge_workers,
        "broker": broker_cpu(broker),
    }


class Probe:
    """Probe events for one customer, sent to the edge every PROBE_INTERVAL (each after the
    previous one's answer), and a poller thread asking the core for that customer's count every
    POLL_INTERVAL. One customer's records share a partition and are applied in order, so a
    count of k means probes 0..k-1 are visible: probe i's freshness is the time from its 2xx to
    the first answer with a count above i. The sending does not wait for visibility, so a core
    that falls behind shows as growing freshness, not as fewer probes."""

    def __init__(self, edge: Server, core: Server, meter_id: str) -> None:
        self._edge = edge
        self._core = core
        self._meter_id = meter_id
        self._run = uuid.uuid4().hex[:8]
        self.acked: list[float] = []  # perf_counter of each probe's 2xx, in order
        self.sent_at: list[float] = []
        self.visible: list[float] = []  # perf_counter of the first answer counting probe i
        self.ingest_latency: list[float] = []
        self.errors: list[str] = []
        self.poll_errors: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._give_up_at = float("inf")
        self._poller = threading.Thread(target=self._poll, name="probe-poller", daemon=True)

    @property
    def acknowledged(self) -> int:
        return len(self.acked)

    def send_while(self, sender: threading.Thread) -> None:
        time.sleep(1.0)  # let the background load reach its rate first
        self._poller.start()
        with self._edge.client() as client:
            next_at = time.perf_counter()
            while sender.is_alive():
                wait = next_at - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                next_at = max(next_at + PROBE_INTERVAL, time.perf_counter())
                event = {
                    "name": "freshness_probe",
                    "external_customer_id": PROBE_CUSTOMER,
                    "external_id": f"probe-{self._run}-{len(self.acked) + len(self.errors)}",
                    "metadata": {"tokens": 1},
                }
                sent = time.perf_counter()
                try:
                    response = client.post("/v1/events/ingest", json={"events": [event]})
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                acked = time.perf_counter()
                self.ingest_latency.append(acked - sent)
                self.sent_at.append(sent)
                self.acked.append(acked)

    def finish(self, give_up_after: float) -> dict[str, Any]:
        """Wait (at most `give_up_after`) until every acknowledged probe is visible."""
        self._give_up_at = time.perf_counter() + give_up_after
        self._stop.set()
        self._poller.join()
        first = self.sent_at[0] if self.sent_at else 0.0
        return {
            "acknowledged": len(self.acked),
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "never_visible": len(self.acked) - len(self.visible),
            "polls": self.polls,
            "poll_errors": self.poll_errors,
            # An answer can come back before the 2xx is read: then it counts from the 2xx.
            "freshness": [max(0.0, v - a) for a, v in zip(self.acked, self.visible, strict=False)],
            "sent_at": [t - first for t in self.sent_at],
            "ingest_latency": self.ingest_latency,
        }

    def _poll(self) -> None:
        params = {
            "meter_id": self._meter_id,
            "external_customer_id": PROBE_CUSTOMER,
            "units": "0",
        }
        path = "/v1/customer-meters/check"
        with self._core.client() as client:
            while True:
                done = self._stop.is_set()  # read first: then every acked probe is in `acked`
                if done and len(self.visible) >= len(self.acked):
                    return
                if time.perf_counter() > self._give_up_at:
                    return
                self.polls += 1
                try:
                    answer = client.get(path, params=params)
                except httpx.HTTPError as exc:
                    answer = None
                    if len(self.poll_errors) < 5:
                        self.poll_errors.append(f"{type(exc).__name__}: {exc}")
                seen = time.perf_counter()
                if answer is not None and answer.status_code == 200:
                    count = min(int(answer.json()["consumed_units"]), len(self.acked))
                    while len(self.visible) < count:
                        self.visible.append(seen)
                elif answer is not None and len(self.poll_errors) < 5:
                    self.poll_errors.append(f"{answer.status_code}: {answer.text[:200]}")
                time.sleep(POLL_INTERVAL)


def core_metrics(core: Server) -> dict[str, Any]:
    """The core's consumer counters from `/metrics` (Prometheus text)."""
    text = httpx.get(f"{core.url}/metrics", timeout=30).text
    lag: dict[str, int] = {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("meterline_consumer_lag_records"):
            lag[name.partition('partition="')[2].rstrip('"}')] = int(float(value))
        else:
            values[name] = float(value)
    return {"lag": lag, **values}


def _drain(core: Server, published: int, since: float, give_up_after: float) -> dict[str, Any]:
    """Wait until the core has applied everything published; seconds since `since` (the end
    of the load)."""
    applied = 0.0
    while time.perf_counter() - since < give_up_after:
        applied = core_metrics(core).get("meterline_consumer_applied_events_total", 0.0)
        if applied >= published:
            break
        time.sleep(0.05)
    return {
        "seconds": round(time.perf_counter() - since, 3),
        "published": published,
        "applied": int(applied),
        "complete": applied >= published,
    }
