"""The core's part of `GET /metrics` (Prometheus text): what the store, the consumer, the
forwarder and the webhook sender are holding back or refusing; how far behind the journal the
core is, when its last snapshot was taken, and what its data dir holds (`meterline status`
reads them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from functools import partial
from pathlib import Path

from aggregator.backup import Taken
from aggregator.export.exporter import Exporter
from aggregator.intake.consumer import Consumer
from aggregator.intake.journal import Journal
from aggregator.store import Store, failed_meters, failures
from aggregator.upstream.forwarder import Forwarder
from ingest.http import Source

SIZE_SECONDS = 10.0  # a data dir's size is walked again at most this often
LAG_SECONDS = 1.0  # the journal's end asked of the broker for at most this long


def sources(store: Store, consumer: Consumer | None, forwarder: Forwarder | None) -> list[Source]:
    """The core's figures, after the edge's (`ingest.http.metrics_route`)."""
    found: list[Source] = [partial(_store, store, _DataDirSize(Path(store.path).parent))]
    found.append(partial(_webhooks, store))
    if forwarder is not None:
        found.append(partial(_forwarder, forwarder))
    if consumer is not None:
        found.append(partial(_consumer, consumer))
    return found


def snapshots(taken: Taken) -> Source:
    """When the core's last snapshot was taken, by its schedule (`--backup-to`) or asked
    (`meterline backup`), and its failures; 0 for never (and for no schedule), so that every
    series has a sample from the start."""

    async def lines() -> list[str]:
        found = [
            "# HELP meterline_snapshot_failures_total snapshots that failed since the start",
            "# TYPE meterline_snapshot_failures_total counter",
            f"meterline_snapshot_failures_total {taken.failures}",
        ]
        for name, value, text in (
            ("last_timestamp_seconds", taken.last_at, "when the last snapshot was taken"),
            ("last_failure_timestamp_seconds", taken.failed_at, "when a snapshot last failed"),
            ("every_seconds", taken.every_seconds, "the period of --backup-to's snapshots"),
        ):
            found += [
                f"# HELP meterline_snapshot_{name} {text} (0: none)",
                f"# TYPE meterline_snapshot_{name} gauge",
                f"meterline_snapshot_{name} {value or 0}",
            ]
        return found

    return lines


def export(exporter: Exporter) -> Source:
    """The lakehouse export (`--export-to`): how far behind the store it is, in events (seqs
    stored, not read yet) and in seconds (since the next of them was ingested), when it last
    committed, what it did since the start, and whether its last attempt failed. Only the
    leader exports: a core that follows says 0 behind (the leader's figures are the table's)."""

    async def lines() -> list[str]:
        events, seconds = await exporter.lag()
        found: list[str] = []
        for name, kind, value, text in (
            ("lag_events", "gauge", events, "current events not in the exported table yet"),
            ("lag_seconds", "gauge", seconds, "how long the oldest of them has waited"),
            (
                "last_commit_timestamp_seconds",
                "gauge",
                (exporter.last_commit_us or 0) / 1e6,
                "when the exporter last committed to the table (0: not since the start)",
            ),
            (
                "usage_last_refresh_timestamp_seconds",
                "gauge",
                (exporter.usage.last_refresh_us or 0) / 1e6,
                "the changes each customer meter's usage per day covers, up to (0: none yet)",
            ),
            ("events_total", "counter", exporter.exported, "events exported since the start"),
            ("deleted_total", "counter", exporter.deleted, "voided events deleted since the start"),
            ("failing", "gauge", int(exporter.last_error is not None), "1: its last try failed"),
        ):
            found += [
                f"# HELP meterline_export_{name} {text}",
                f"# TYPE meterline_export_{name} {kind}",
                f"meterline_export_{name} {value}",
            ]
        return found

    return lines


def journal_lag(journal: Journal) -> Source:
    """The journal's entries not applied here yet (Kafka mode): how far behind the others this
    core is; a leader's is what it has yet to catch up on after it took over."""

    async def lines() -> list[str]:
        found = ["# TYPE meterline_journal_lag_entries gauge"]
        with contextlib.suppress(Exception):  # the broker away: no figure, not a failed scrape
            async with asyncio.timeout(LAG_SECONDS):
                found.append(f"meterline_journal_lag_entries {await journal.lag()}")
        return found

    return lines


class _DataDirSize:
    """The bytes of the files under a data dir, walked in a thread at most every
    `SIZE_SECONDS` (its segments can be many files)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._walked_at = -SIZE_SECONDS
        self._bytes = 0

    async def bytes(self) -> int:
        if time.monotonic() - self._walked_at >= SIZE_SECONDS:
            self._bytes = await asyncio.to_thread(_size, self._folder)
            self._walked_at = time.monotonic()
        return self._bytes


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # deleted while walked (a merged segment)
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_blocks * 512
    return total


async def _store(store: Store, size: _DataDirSize) -> list[str]:
    writer = store.writer
    failed = await store.read(failed_meters)
    # The data dir's file system: a full disk refuses writes (503 StorageFull) until freed.
    disk = shutil.disk_usage(Path(store.path).parent)
    lines = [
        "# HELP meterline_store_disk_free_bytes free bytes of the data dir's file system",
        "# TYPE meterline_store_disk_free_bytes gauge",
        f"meterline_store_disk_free_bytes {disk.free}",
        "# TYPE meterline_store_disk_size_bytes gauge",
        f"meterline_store_disk_size_bytes {disk.total}",
        "# HELP meterline_store_data_dir_bytes bytes the data dir's files take on the disk",
        "# TYPE meterline_store_data_dir_bytes gauge",
        f"meterline_store_data_dir_bytes {await size.bytes()}",
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


# Gauges of what is failing now (read from the store, so they hold across restarts).
_WEBHOOK_GAUGES = (
    (
        "failing_endpoints",
        "enabled webhook endpoints whose deliveries fail since their last success",
    ),
    ("disabled_endpoints", "webhook endpoints meterline disabled after failing too long"),
    ("retrying_deliveries", "webhook deliveries waiting for a retry after a failed attempt"),
)


async def _webhooks(store: Store) -> list[str]:
    # Every organization with endpoints; none: one series at 0 (a panel then plots 0, not
    # "No data").
    found = await store.read_now(failures) or [("", 0, 0, 0)]
    lines = []
    for i, (name, text) in enumerate(_WEBHOOK_GAUGES, start=1):
        lines += [
            f"# HELP meterline_webhook_{name} {text}",
            f"# TYPE meterline_webhook_{name} gauge",
        ]
        lines.extend(
            f'meterline_webhook_{name}{{organization_id="{row[0]}"}} {row[i]}' for row in found
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
        "# HELP meterline_consumer_moved_events_total events moved to their customer's shard",
        "# TYPE meterline_consumer_moved_events_total counter",
        f"meterline_consumer_moved_events_total {consumer.moved}",
    ]
    lines += _per_organization(consumer)
    lines.append("# TYPE meterline_consumer_batch_commit_seconds summary")
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


def _per_organization(consumer: Consumer) -> list[str]:
    """Per producer's organization (an operator's endpoint: ids as labels are fine here); dead
    letters that name no existing organization under organization_id="". The latest reason of
    each, as an info-style gauge whose value is when (ms since the epoch)."""
    counts = sorted(consumer.organizations.items())
    prefix = "meterline_consumer_organization"
    lines = [
        "# HELP meterline_consumer_organization_applied_events_total events applied, per"
        " organization (duplicates included)",
        "# TYPE meterline_consumer_organization_applied_events_total counter",
    ]
    lines += [
        f'{prefix}_applied_events_total{{organization_id="{o}"}} {c.applied}' for o, c in counts
    ]
    lines += [
        "# HELP meterline_consumer_organization_dead_lettered_total records or rows"
        " dead-lettered, per organization",
        "# TYPE meterline_consumer_organization_dead_lettered_total counter",
    ]
    lines += [
        f'{prefix}_dead_lettered_total{{organization_id="{o}"}} {c.dead_lettered}'
        for o, c in counts
    ]
    lines += [
        "# HELP meterline_consumer_last_dead_letter_timestamp_ms the latest dead letter's"
        " reason, per organization",
        "# TYPE meterline_consumer_last_dead_letter_timestamp_ms gauge",
    ]
    lines += [
        f'meterline_consumer_last_dead_letter_timestamp_ms{{organization_id="{o}",'
        f'reason="{_label(c.reasons[-1][1])}"}} {c.reasons[-1][0]}'
        for o, c in counts
        if c.reasons
    ]
    return lines


def _label(text: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
