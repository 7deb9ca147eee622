"""`GET /metrics` in Prometheus text: what each part of a process is holding back or refusing.
Behind a bearer token when one is configured (the figures name organizations and meters)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from aggregator.consumer import Consumer
from aggregator.forwarder import Forwarder
from aggregator.store import Store
from aggregator.store.meters import failed_meters
from ingest.http.admission import Admission
from ingest.http.responses import unauthorized


@dataclass(frozen=True, slots=True)
class Sources:
    admission: Admission
    store: Store | None = None
    consumer: Consumer | None = None
    forwarder: Forwarder | None = None


def route(sources: Sources, token: str | None) -> Route:
    async def metrics(request: Request) -> Response:
        if token is not None and not _authorized(request, token):
            return unauthorized()
        lines = _admission(sources.admission)
        if sources.store is not None:
            lines += await _store(sources.store)
        if sources.forwarder is not None:
            lines += await _forwarder(sources.forwarder)
        if sources.consumer is not None:
            lines += await _consumer(sources.consumer)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return Route("/metrics", metrics, methods=["GET"])


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


def _admission(admission: Admission) -> list[str]:
    lines = [
        "# TYPE meterline_ingest_inflight_requests gauge",
        f"meterline_ingest_inflight_requests {admission.inflight}",
        "# TYPE meterline_ingest_buffered_bytes gauge",
        f"meterline_ingest_buffered_bytes {admission.buffered_bytes}",
        "# HELP meterline_ingest_refused_total ingest requests refused by a limit (reason:"
        " token_rate, organization_rate, organization_inflight, inflight, organization_bytes,"
        " buffered_bytes, body_timeout)",
        "# TYPE meterline_ingest_refused_total counter",
    ]
    for (reason, org), count in sorted(admission.refused.items()):
        lines.append(
            f'meterline_ingest_refused_total{{reason="{reason}",organization_id="{org}"}} {count}'
        )
    return lines


async def _store(store: Store) -> list[str]:
    writer = store.writer
    failed = await store.read(failed_meters)
    lines = [
        "# TYPE meterline_writer_over_bound_total counter",
        f"meterline_writer_over_bound_total {writer.over_bound}",
        "# TYPE meterline_writer_longest_job_seconds gauge",
        f"meterline_writer_longest_job_seconds {writer.longest_seconds}",
        "# HELP meterline_meter_failed a meter skipped because it cannot be evaluated",
        "# TYPE meterline_meter_failed gauge",
    ]
    lines.extend(
        f'meterline_meter_failed{{organization_id="{m.organization_id}",meter_id="{m.id}"}} 1'
        for m in failed
    )
    return lines


async def _forwarder(forwarder: Forwarder) -> list[str]:
    return [
        "# TYPE meterline_forward_backlog_events gauge",
        f"meterline_forward_backlog_events {await forwarder.backlog()}",
        "# TYPE meterline_forward_sent_total counter",
        f"meterline_forward_sent_total {forwarder.sent}",
        "# TYPE meterline_forward_retried_total counter",
        f"meterline_forward_retried_total {forwarder.retried}",
        "# TYPE meterline_forward_quarantined_total counter",
        f"meterline_forward_quarantined_total {forwarder.refused}",
    ]


async def _consumer(consumer: Consumer) -> list[str]:
    lines = ["# TYPE meterline_consumer_lag_records gauge"]
    for partition, lag in sorted((await consumer.lag()).items()):
        lines.append(f'meterline_consumer_lag_records{{partition="{partition}"}} {lag}')
    lines += [
        "# TYPE meterline_consumer_applied_events_total counter",
        f"meterline_consumer_applied_events_total {consumer.applied}",
        "# TYPE meterline_consumer_dead_lettered_total counter",
        f"meterline_consumer_dead_lettered_total {consumer.dead_lettered}",
        "# TYPE meterline_consumer_batch_commit_seconds summary",
    ]
    timings = sorted(consumer.commit_seconds)
    for q in (0.5, 0.99):
        value = timings[min(len(timings) - 1, int(q * len(timings)))] if timings else 0.0
        lines.append(f'meterline_consumer_batch_commit_seconds{{quantile="{q}"}} {value}')
    resets: dict[int, list[int]] = {}
    for reset in await consumer.offset_resets():
        counts = resets.setdefault(reset.partition, [0, 0])
        counts[0] += 1
        counts[1] += reset.vanished or 0
    lines.append("# TYPE meterline_kafka_offset_resets_total counter")
    lines += [
        f'meterline_kafka_offset_resets_total{{partition="{p}"}} {n}'
        for p, (n, _) in sorted(resets.items())
    ]
    lines.append("# TYPE meterline_kafka_offsets_vanished_total counter")
    lines += [
        f'meterline_kafka_offsets_vanished_total{{partition="{p}"}} {v}'
        for p, (_, v) in sorted(resets.items())
    ]
    return lines
