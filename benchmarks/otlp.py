"""OTLP trace exports: CPU per span of turning a `POST /v1/traces` body into events.

    .venv/bin/python -m benchmarks.run otlp

Hypothesis: a flood of spans that are not GenAI costs little: reading an export of ordinary
spans (an HTTP server's, 8 attributes each) with 1% GenAI spans costs at most 5 µs of CPU per
span (200,000 spans a second on one core), at most 3× what protobuf's own C parser takes
to read the same bytes into objects (which reads them and no more).

Method, in this process, one core: 20 exports of 1,000 spans, encoded by opentelemetry-proto
as the OTLP exporter sends them, go through, interleaved, round after round: the C parser alone
(the reference), and `OtlpTraces.convert` (decode, map the usage spans, validate their events,
as the route does before publishing). The same again with every span a GenAI one, beside the
ingest validator on the events they become (what the route adds per usage event). CPU time per
span is the median over 7 rounds. Then the same through a `meterline up` (embedded), new
exports each round sent four at a time from this process: spans accepted a second, and the
server's CPU per span against `convert` alone (what HTTP, admission and storing the usage
events add).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from starlette.datastructures import Headers

from benchmarks.common import cpu_us, metric
from benchmarks.server import Server
from ingest.http.otlp import OtlpSettings, OtlpTraces
from meters.events import EventRules
from meters.times import now_us

SPANS = 1000
_HEADERS = Headers({"content-type": "application/x-protobuf"})


def _kv(key: str, value: str | int) -> KeyValue:
    any_value = AnyValue(int_value=value) if type(value) is int else AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def _export(rng: random.Random, genai_share: float) -> bytes:
    trace = rng.randbytes(16)
    root = rng.randbytes(8)
    spans = []
    for i in range(SPANS):
        attributes = [
            _kv("http.request.method", "POST"),
            _kv("http.route", "/v1/chat"),
            _kv("url.path", f"/v1/chat/{i}"),
            _kv("http.response.status_code", 200),
            _kv("server.address", "api.example.com"),
            _kv("server.port", 443),
            _kv("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64)"),
            _kv("network.protocol.version", "1.1"),
        ]
        if rng.random() < genai_share:
            attributes = [
                _kv("gen_ai.operation.name", "chat"),
                _kv("gen_ai.provider.name", "openai"),
                _kv("gen_ai.request.model", "gpt-4o-mini"),
                _kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
                _kv("gen_ai.usage.input_tokens", rng.randint(10, 5000)),
                _kv("gen_ai.usage.output_tokens", rng.randint(10, 2000)),
                *attributes[:2],
            ]
        spans.append(
            Span(
                trace_id=trace,
                span_id=root if i == 0 else rng.randbytes(8),
                parent_span_id=b"" if i == 0 else root,
                name="POST /v1/chat",
                start_time_unix_nano=time.time_ns() - 1_000_000,
                end_time_unix_nano=time.time_ns(),
                attributes=attributes,
            )
        )
    spans[0].attributes.append(_kv("meterline.customer.external_id", f"cust-{rng.randint(1, 99)}"))
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[_kv("service.name", "chat-api")]),
                scope_spans=[ScopeSpans(spans=spans)],
            )
        ]
    )
    return request.SerializeToString()


def run(quick: bool) -> dict[str, Any]:
    exports = 4 if quick else 20
    rounds = 3 if quick else 7
    rng = random.Random(45)
    ordinary = [_export(rng, 0.01) for _ in range(exports)]
    genai = [_export(rng, 1.0) for _ in range(exports)]
    rules, settings, now = EventRules(), OtlpSettings(), now_us()

    def convert(bodies: list[bytes]) -> None:
        for body in bodies:
            OtlpTraces(_HEADERS, settings, rules, 10 * 1024 * 1024, now).convert(body)

    def parse(bodies: list[bytes]) -> None:
        for body in bodies:
            ExportTraceServiceRequest.FromString(body)

    jobs: dict[str, Callable[[], Any]] = {
        "parse": lambda: parse(ordinary),
        "convert": lambda: convert(ordinary),
        "parse_genai": lambda: parse(genai),
        "convert_genai": lambda: convert(genai),
    }
    spans = exports * SPANS
    seen: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            seen[name].append(cpu_us(job, spans))
    us = {name: statistics.median(values) for name, values in seen.items()}
    http = _over_http(rng, exports, rounds)
    return {
        "metrics": [
            metric("CPU per span, 1% GenAI (convert)", us["convert"], "µs", "<=", 5.0),
            metric("spans a second on one core, 1% GenAI", 1e6 / us["convert"], "spans/s"),
            metric("protobuf C parser per span (reference)", us["parse"], "µs"),
            metric("convert / C parser, 1% GenAI", us["convert"] / us["parse"], "x", "<=", 3.0),
            metric(
                "CPU per span, all GenAI (convert, events validated)", us["convert_genai"], "µs"
            ),
            metric("convert / C parser, all GenAI", us["convert_genai"] / us["parse_genai"], "x"),
            metric("over HTTP: spans accepted a second, 1% GenAI", http["spans_per_s"], "spans/s"),
            metric("over HTTP: server CPU per span", http["server_us"], "µs"),
            metric("over HTTP: server CPU / convert alone", http["server_us"] / us["convert"], "x"),
        ],
        "details": {"spans": spans, "rounds": rounds, "cpu_us_rounds": seen, "http": http},
    }


def _over_http(rng: random.Random, exports: int, rounds: int) -> dict[str, Any]:
    """`POST /v1/traces` of a `meterline up`: new exports each round (their usage spans are
    new events), sent 4 at a time; wall spans a second and the server's CPU per span, medians
    over the rounds."""
    per_s, server_us = [], []
    with Server() as server, httpx.Client(timeout=60) as client:
        headers = {
            "Authorization": f"Bearer {server.token}",
            "Content-Type": "application/x-protobuf",
        }

        def send(body: bytes) -> None:
            answer = client.post(f"{server.url}/v1/traces", content=body, headers=headers)
            assert answer.status_code == 200 and not answer.content, answer.text

        for body in [_export(rng, 0.01) for _ in range(2)]:  # warm-up
            send(body)
        with ThreadPoolExecutor(4) as pool:
            for _ in range(rounds):
                bodies = [_export(rng, 0.01) for _ in range(exports)]
                cpu, started = server.cpu_seconds()[0], time.perf_counter()
                list(pool.map(send, bodies))
                seconds = time.perf_counter() - started
                per_s.append(exports * SPANS / seconds)
                server_us.append((server.cpu_seconds()[0] - cpu) / (exports * SPANS) * 1e6)
    return {
        "spans_per_s": statistics.median(per_s),
        "server_us": statistics.median(server_us),
        "rounds_spans_per_s": per_s,
        "rounds_server_us": server_us,
    }
