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
span is the median over 7 rounds. Publishing is ingest's, measured by `ingest_http`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from starlette.datastructures import Headers

from benchmarks.common import cpu_us, metric
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
        ],
        "details": {"spans": spans, "rounds": rounds, "cpu_us_rounds": seen},
    }
